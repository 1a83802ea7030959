"""
Calling the resident: the L{IDialer} interface and its three kinds.

The contract
============

Every kind receives the same L{DialRequest}, as this JSON object (L{DialRequest.to_dict}):

    {"uuid": "<the visitor's session UUID>",
     "leg_uuid": "<a fresh UUID for this one dial>",
     "dial": "<the resident's dial string from the directory, e.g. PJSIP/501>",
     "apartment": "501", "resident": "Maria Souza",
     "extension_id": 1, "return_extension": "1002",
     "audiosocket": "<host>:<return_port>",
     "timeout_s": 30.0}

  - C{uuid} is the visitor's session, for correlation only. The visitor's side chose it (it is
    whatever UUID the visitor's C{AudioSocket()} sent), so it is never a credential.
  - C{leg_uuid} is made by the server for this one dial attempt (C{uuid4}, from the operating
    system's CSPRNG). It is what the PBX passes to C{AudioSocket()} for the resident's call,
    and the only UUID the extension's return port accepts for that dial: once, within the
    attempt's ring window (C{timeout_s} plus a short grace for the connect and handshake),
    from a peer in C{[server] allowed_peers}. Each attempt gets a new one.
  - C{audiosocket} is where the PBX connects the resident's answered call; C{timeout_s} how
    long the resident's phone may ring.

A dialer only I{starts} the resident's call: its Deferred fires L{None} once the attempt is
accepted (or answered, for AMI) and fails with L{DialFailed} as soon as the attempt is known to
have failed. The resident's leg itself arrives later on the extension's return port carrying
C{leg_uuid}; the flow waits for it with its own ring timeout.

Cancel
======

Whenever an attempt ends without the resident's leg joining — its ring window passed, the
dialer reported a failure, the visitor hung up while it rang, or the call ended for any other
reason (maximum call time, an operator, shutdown) — the flow calls C{cancel(leg_uuid)}: the
resident's phone must stop ringing (an answer would reach a return port that no longer accepts
that C{leg_uuid}, and the resident would hear silence). C{cancel} is idempotent, may come after
the attempt has failed or ended by itself (it is then a no-op, or a harmless repeat), never
raises, and its Deferred never fails: problems are logged, never raised into the call.

  - L{LogDialer} logs C{cancel dial: leg <leg_uuid> …}.
  - L{HttpDialer} POSTs C{{"event": "cancel", "uuid": "<session>", "leg_uuid": "<leg>"}} to
    the same URL (a 2xx status means done; anything else, or no answer within its timeout,
    is logged), once, and only for a C{leg_uuid} it dialed in the last hour.
  - L{AmiDialer} hangs up the channel it originated (AMI C{Hangup}, C{Channel=<its
    uniqueid>}): it originates with a C{ChannelId} (and C{OtherChannelId}, for the second
    half of a C{Local/…} channel) of its own, so it can name that channel from the start.
    Hanging up the originated channel (C{Local/…;1}) ends the C{;2} half and the C{Dial()}
    behind it: the resident's phone stops ringing. If C{cancel} comes before Asterisk has
    created the channel, the channel is hung up as soon as its C{Newchannel} event arrives.
    A channel whose C{OriginateResponse} reported a failure, or whose C{Hangup} event was
    seen, is gone: nothing is sent for it. C{Hangup} needs the AMI user's C{write = call}
    (besides C{originate}); a refused one is logged as an error.

Hand-off
========

C{handoff(uuid, action, argument)} gives the visitor's call back to the PBX with an
instruction for what its dialplan does after C{AudioSocket()} returns: C{action} is
C{"transfer"} (C{argument}: the dial string of a human operator) or C{"open"} (C{argument}:
the DTMF digits that open a gate). C{uuid} is the visitor's call UUID (the one its
C{AudioSocket()} sent). The flow waits for the hand-off (bounded) before it sends the visitor's
hangup frame, so the instruction is there when the dialplan reads it. C{argument} may not
contain a comma (the dialplan splits the instruction on the first one) nor a line break.

  - L{LogDialer} logs C{handoff of call <uuid>: transfer <argument>}.
  - L{HttpDialer} POSTs C{{"event": "transfer", "uuid": "<call>", "dial": "<argument>"}} (or
    C{{"event": "open", "uuid": ..., "digits": ...}}); a 2xx status means done.
  - L{AmiDialer} sends C{DBPut} with C{Family=audiosocket}, C{Key=<uuid>},
    C{Val=<action>,<argument>}: the shipped visitor context reads it with
    C{DB_DELETE(audiosocket/${CALL_UUID})}. C{DBPut} needs the AMI user's C{write = system}
    (with C{originate} alone Asterisk answers "Permission denied").

The Deferred fires L{None} once the PBX (or webhook) has acknowledged it and fails with
L{HandoffFailed} otherwise.

  - L{LogDialer} only logs the request, C{leg_uuid} included, so an operator can play the
    resident's leg by hand (C{audiosocket-call --port <return_port> --uuid <leg_uuid>}).
  - L{HttpDialer} POSTs the request as JSON to a webhook; 2xx means accepted; any other status,
    or no answer within its timeout, is a failed attempt (its reason the answer's
    C{{"reason": "busy"}}, one of L{REASONS}, when it gives one).
  - L{AmiDialer} is an Asterisk Manager Interface client (L{AmiProtocol}) that logs in once,
    reconnects with backoff and sends C{Originate} with C{Channel=<dial>},
    C{Context=<configured>}, C{Exten=s}, C{Priority=1}, C{Async=true},
    C{Timeout=<timeout_s in ms>}, C{CallerID=<return_extension>},
    C{ChannelId=<a uniqueid of its own>}, C{OtherChannelId=<the same>-2} (neither derived
    from C{leg_uuid}: a channel's uniqueid shows in CDRs and events, a credential must not)
    and the channel variables
    C{AUDIOSOCKET_UUID=<leg_uuid>} (so a dialplan running
    C{AudioSocket(${AUDIOSOCKET_UUID},${AUDIOSOCKET_HOST})} needs no change),
    C{AUDIOSOCKET_HOST=<audiosocket>} and C{AUDIOSOCKET_SESSION=<uuid>} (correlation).
    Asterisk's C{OriginateResponse} event reports the outcome. No value may contain a line
    break (it would start a new AMI header) and no C{Variable} value a comma (Asterisk splits
    C{Variable} on commas, so it would set further channel variables): such a request is
    refused before anything is sent.
"""

from __future__ import annotations

import itertools
import json
import uuid as _uuid
from typing import Callable, Iterable
from urllib.parse import urlsplit

import attrs
import treq
from attrs import frozen
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from zope.interface import Attribute, Interface, implementer

from audiosocket.reactors import default_reactor

__all__ = [
    "AmiDialer",
    "AmiProtocol",
    "DialFailed",
    "DialRequest",
    "HandoffFailed",
    "HttpDialer",
    "IDialer",
    "LogDialer",
    "make_dialer",
]

REASONS = ("busy", "no_answer", "congestion", "rejected", "unreachable", "timeout", "error")


class DialFailed(Exception):
    """
    The attempt to call the resident failed.

    @ivar reason: one of L{REASONS}: C{busy}, C{no_answer}, C{congestion}, C{rejected} (the
        PBX or webhook refused the request), C{unreachable} (no connection to it),
        C{timeout} (it did not answer in time) or C{error}.
    @ivar message: what happened, for logs and the call record.
    """

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError("unknown dial failure reason {!r}".format(reason))
        super().__init__("{}: {}".format(reason, message))
        self.reason = reason
        self.message = message


#: Hand-off actions → the name of their argument in the http dialer's event.
HANDOFF_ACTIONS = {"transfer": "dial", "open": "digits"}


class HandoffFailed(Exception):
    """The PBX (or webhook) did not take the hand-off; the message says why."""


def check_handoff(uuid: str, action: str, argument: str) -> None:
    """
    @raise ValueError: C{action} is not one of L{HANDOFF_ACTIONS}, C{uuid} is not a UUID, or
        C{argument} is empty or holds a comma or a line break.
    """
    if action not in HANDOFF_ACTIONS:
        raise ValueError("unknown hand-off action {!r}".format(action))
    _uuid.UUID(uuid)
    if not isinstance(argument, str) or not argument.strip():
        raise ValueError("hand-off argument must not be empty")
    if any(c in argument for c in ",\r\n"):
        raise ValueError("hand-off argument must not contain a comma or a line break")


# -- the request ---------------------------------------------------------------------------


def _text(field_name: str, *, empty: bool = False):
    def check(instance, attribute, value):
        if not isinstance(value, str):
            raise ValueError("{}: must be a string, not {!r}".format(field_name, value))
        if not empty and not value.strip():
            raise ValueError("{}: must not be empty".format(field_name))
        # Every field may end up in an AMI header or a log line: a line break would let a
        # directory entry inject headers into the Originate action.
        if "\r" in value or "\n" in value:
            raise ValueError("{}: must not contain a line break".format(field_name))

    return check


def _uuid_text(instance, attribute, value):
    name = attribute.name
    _text(name)(instance, attribute, value)
    try:
        _uuid.UUID(value)
    except ValueError:
        raise ValueError("{}: must be a UUID, not {!r}".format(name, value)) from None


def _host_port(instance, attribute, value):
    _text("audiosocket")(instance, attribute, value)
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("audiosocket: must be host:port, not {!r}".format(value))


def _extension_id(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("extension_id: must be an integer, not {!r}".format(value))


def _timeout(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("timeout_s: must be a positive number, not {!r}".format(value))


@frozen
class DialRequest:
    """
    What every dialer receives (the contract in this module's docstring).

    @ivar uuid: the visitor's session UUID, for correlation only (never a credential).
    @ivar leg_uuid: the fresh UUID of this dial attempt: the PBX passes it to C{AudioSocket()}
        and the return port accepts the resident's leg only with it.
    @ivar dial: the resident's dial string from the directory (C{PJSIP/501}).
    @ivar audiosocket: C{host:return_port} where Asterisk connects the resident's leg.
    @ivar timeout_s: how long the resident's phone may ring.
    """

    uuid: str = attrs.field(validator=_uuid_text)
    leg_uuid: str = attrs.field(validator=_uuid_text)
    dial: str = attrs.field(validator=_text("dial"))
    apartment: str = attrs.field(validator=_text("apartment", empty=True))
    resident: str = attrs.field(validator=_text("resident", empty=True))
    extension_id: int = attrs.field(validator=_extension_id)
    return_extension: str = attrs.field(validator=_text("return_extension", empty=True))
    audiosocket: str = attrs.field(validator=_host_port)
    timeout_s: float = attrs.field(validator=_timeout)

    def to_dict(self) -> dict:
        """The request as the contract's JSON object."""
        return {
            "uuid": self.uuid,
            "leg_uuid": self.leg_uuid,
            "dial": self.dial,
            "apartment": self.apartment,
            "resident": self.resident,
            "extension_id": self.extension_id,
            "return_extension": self.return_extension,
            "audiosocket": self.audiosocket,
            "timeout_s": self.timeout_s,
        }


class IDialer(Interface):
    """Something that can ask the PBX to call a resident."""

    name = Attribute("The dialer kind: C{'log'}, C{'http'} or C{'ami'}.")

    def dial(request: DialRequest) -> Deferred:
        """
        Start calling the resident.

        @return: a Deferred firing L{None} when the attempt is accepted or proceeding, or
            failing with L{DialFailed} as soon as it is known to have failed. Cancelling it
            forgets the attempt and frees what it held (it does I{not} stop the phone
            ringing: L{cancel} does).
        """

    def cancel(leg_uuid: str) -> Deferred:
        """
        Stop the dial made with C{leg_uuid}: the resident's phone stops ringing (or an
        answered call whose leg did not join is hung up). Idempotent; a C{leg_uuid} it does
        not know (never dialed, already over, already cancelled) is a no-op.

        @return: a Deferred firing L{None} once done; it never fails (errors are logged).
        """

    def handoff(uuid: str, action: str, argument: str) -> Deferred:
        """
        Leave the instruction C{action,argument} for the dialplan of the visitor's call
        C{uuid} (see the module docstring).

        @return: a Deferred firing L{None} once acknowledged, failing with L{HandoffFailed}
            (or C{ValueError} for a bad C{action}/C{argument}) otherwise.
        """

    def notify(event: dict) -> Deferred:
        """
        Tell the resident something happened without calling them: C{event} is
        C{{"kind": "preauthorized", "uuid", "condominium_id", "apartment", "visitor_name",
        "preauth_id"}} when a pre-authorised visitor came in. The http dialer POSTs it as
        C{{"event": "notify", ...}}; the others log a line (apartment and pre-authorisation,
        not the visitor's name).

        @return: a Deferred firing L{None}; it never fails (errors are logged).
        """


def _log_notice(log: Logger, event: dict) -> Deferred:
    log.info(
        "notify the resident of apartment {apartment} (condominium {condominium_id}): "
        "{kind} (pre-authorisation {preauth_id}, call {uuid})",
        apartment=event.get("apartment"),
        condominium_id=event.get("condominium_id"),
        kind=event.get("kind"),
        preauth_id=event.get("preauth_id"),
        uuid=event.get("uuid"),
    )
    return succeed(None)


def _shown(action: str, argument: str) -> str:
    """A hand-off's argument as a log line shows it: a gate's digits are the building's secret."""
    return "(gate digits)" if action == "open" else argument


# -- log -------------------------------------------------------------------------------------


@implementer(IDialer)
class LogDialer:
    """Only logs the request, for trying the server without a PBX; the ring timeout applies."""

    name = "log"
    log = Logger()

    def dial(self, request: DialRequest) -> Deferred:
        self.log.info(
            "would dial {dial} for apartment {apartment} ({resident}), session {uuid}: "
            "the resident's leg connects to {audiosocket} with UUID {leg_uuid} "
            "(extension {extension_id}, ring {timeout_s} s)",
            **request.to_dict(),
        )
        return succeed(None)

    def cancel(self, leg_uuid: str) -> Deferred:
        self.log.info(
            "cancel dial: leg {leg_uuid} is no longer expected (stop its call, if any)",
            leg_uuid=leg_uuid,
        )
        return succeed(None)

    def handoff(self, uuid: str, action: str, argument: str) -> Deferred:
        try:
            check_handoff(uuid, action, argument)
        except ValueError as e:
            return fail(e)
        self.log.info(
            "handoff of call {uuid}: {action} {argument}",
            uuid=uuid,
            action=action,
            argument=_shown(action, argument),
        )
        return succeed(None)

    def notify(self, event: dict) -> Deferred:
        return _log_notice(self.log, event)


# -- http ------------------------------------------------------------------------------------


@implementer(IDialer)
class HttpDialer:
    """
    POSTs the request as JSON to a webhook. A 2xx status means accepted; any other status,
    a connection error or no answer within C{timeout_s} is a failed attempt. HTTPS
    certificates are verified (the Agent's default browser-like policy).
    """

    name = "http"
    log = Logger()

    def __init__(self, url: str, *, timeout_s: float = 5.0, treq_client=None, reactor=None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("dialer url: must be an http or https URL, not {!r}".format(url))
        if not timeout_s > 0:
            raise ValueError("dialer timeout_s: must be positive, not {!r}".format(timeout_s))
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self._url = url
        self._timeout_s = timeout_s
        if treq_client is None:
            # Not treq's global persistent pool: one webhook call per attempt, and no idle
            # connection outliving it.
            pool = HTTPConnectionPool(reactor, persistent=False)
            treq_client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self._treq = treq_client
        #: leg_uuid → (session uuid, reactor seconds until which a cancel is still sent).
        self._dialed: dict[str, tuple[str, float]] = {}

    #: How long after its dial a C{leg_uuid} can still be cancelled (the flow cancels within
    #: the ring window; this only bounds what is remembered for dials never cancelled).
    REMEMBER_S = 3600.0

    def dial(self, request: DialRequest) -> Deferred:
        now = self._reactor.seconds()
        self._forget_old(now)
        self._dialed[request.leg_uuid] = (request.uuid, now + self.REMEMBER_S)
        return self._dial(request)

    def _forget_old(self, now: float) -> None:
        for leg_uuid in [k for k, (_, until) in self._dialed.items() if until <= now]:
            del self._dialed[leg_uuid]

    def cancel(self, leg_uuid: str) -> Deferred:
        self._forget_old(self._reactor.seconds())
        entry = self._dialed.pop(leg_uuid, None)
        if entry is None:
            return succeed(None)  # never dialed here, or already cancelled
        body = {"event": "cancel", "uuid": entry[0], "leg_uuid": leg_uuid}

        def failed(why):
            self.log.warn(
                "webhook cancel of leg {leg_uuid} (session {uuid}) failed: {why}",
                leg_uuid=leg_uuid,
                uuid=entry[0],
                why=why,
            )
            return None

        return self._within_timeout(self._post_cancel(body), failed)

    def handoff(self, uuid: str, action: str, argument: str) -> Deferred:
        try:
            check_handoff(uuid, action, argument)
        except ValueError as e:
            return fail(e)
        body = {"event": action, "uuid": uuid, HANDOFF_ACTIONS[action]: argument}

        def failed(why):
            self.log.warn(
                "webhook {action} of call {uuid} failed: {why}",
                action=action,
                uuid=uuid,
                why=why,
            )
            return Failure(HandoffFailed("webhook: {}".format(why)))

        return self._within_timeout(self._post_event(body), failed)

    def notify(self, event: dict) -> Deferred:
        body = {"event": "notify", **event}

        def failed(why):
            self.log.warn(
                "webhook notify of call {uuid} failed: {why}", uuid=event.get("uuid"), why=why
            )

        return self._within_timeout(self._post_event(body), failed)

    def _within_timeout(self, coroutine, failed) -> Deferred:
        """
        Run C{coroutine} (a webhook POST), cancelling it after the webhook timeout.

        @param failed: called with why it failed (C{"no answer within N s"} when the timeout
            cut it, else the error's message) when it fails; its result is the result.
        @return: fires with L{None} when the POST succeeded, else with what C{failed} returned.
        """
        timed_out = []
        inner = Deferred.fromCoroutine(coroutine)

        def expire():
            timed_out.append(True)
            inner.cancel()

        timer = self._reactor.callLater(self._timeout_s, expire)

        def settle(result):
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                return failed(
                    "no answer within {} s".format(self._timeout_s)
                    if timed_out
                    else result.getErrorMessage() or repr(result.value)
                )
            return None

        return inner.addBoth(settle)

    async def _post_event(self, body: dict) -> None:
        response = await self._treq.post(self._url, json=body)
        await response.content()
        if not 200 <= response.code < 300:
            raise HandoffFailed("webhook answered HTTP {}".format(response.code))
        self.log.info(
            "webhook took the {event} of call {uuid} (HTTP {code})",
            event=body["event"],
            uuid=body["uuid"],
            code=response.code,
        )

    async def _post_cancel(self, body: dict) -> None:
        response = await self._treq.post(self._url, json=body)
        await response.content()
        if not 200 <= response.code < 300:
            raise DialFailed("rejected", "webhook answered HTTP {}".format(response.code))
        self.log.info(
            "webhook cancelled leg {leg_uuid} of session {uuid} (HTTP {code})",
            leg_uuid=body["leg_uuid"],
            uuid=body["uuid"],
            code=response.code,
        )

    def _dial(self, request: DialRequest) -> Deferred:
        # Cancelling an Agent request fails it with ResponseNeverReceived, not
        # CancelledError, so addTimeout cannot tell a timeout from the caller's cancel:
        # remember which one stopped the request.
        stopped_by = []
        inner = Deferred.fromCoroutine(self._post(request))

        def stop(why):
            stopped_by.append(why)
            inner.cancel()

        outer = Deferred(lambda _: stop("cancel"))
        timer = self._reactor.callLater(self._timeout_s, stop, "timeout")

        def settle(result):
            if timer.active():
                timer.cancel()
            if outer.called:
                return None
            if stopped_by == ["cancel"]:
                outer.errback(defer.CancelledError())
            elif isinstance(result, Failure):
                outer.errback(self._failed(result, request, timed_out=bool(stopped_by)))
            else:
                outer.callback(None)
            return None

        inner.addBoth(settle)
        return outer

    async def _post(self, request: DialRequest) -> None:
        response = await self._treq.post(self._url, json=request.to_dict())
        # Read the body so the connection finishes cleanly; besides a failure's reason, its
        # content is not part of the contract.
        content = await response.content()
        if not 200 <= response.code < 300:
            raise DialFailed(
                _reason_in(content) or ("rejected" if 400 <= response.code < 500 else "error"),
                "webhook answered HTTP {}".format(response.code),
            )
        self.log.info(
            "webhook accepted dial {dial} for session {uuid}, leg {leg_uuid} (HTTP {code})",
            dial=request.dial,
            uuid=request.uuid,
            leg_uuid=request.leg_uuid,
            code=response.code,
        )

    def _failed(self, failure: Failure, request: DialRequest, *, timed_out: bool) -> Failure:
        if timed_out:
            exc = DialFailed(
                "timeout", "webhook did not answer within {} s".format(self._timeout_s)
            )
        elif failure.check(DialFailed):
            exc = failure.value
        elif failure.check(error.ConnectError, error.DNSLookupError):
            exc = DialFailed(
                "unreachable", "cannot connect to webhook: {}".format(failure.value)
            )
        elif failure.check(ResponseNeverReceived):
            exc = DialFailed("unreachable", "webhook closed the connection without answering")
        else:
            exc = DialFailed("error", "webhook request failed: {!r}".format(failure.value))
        self.log.warn(
            "dial {dial} for session {uuid} failed: {why}",
            dial=request.dial,
            uuid=request.uuid,
            why=exc,
        )
        return Failure(exc)


def _reason_in(content: bytes) -> str | None:
    """A failed dial's C{{"reason": "busy"}} (one of L{REASONS}) in a webhook's answer."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    reason = body.get("reason") if isinstance(body, dict) else None
    return reason if reason in REASONS else None


# -- AMI -------------------------------------------------------------------------------------


def _check_header_value(what: str, value: str) -> None:
    # A line break would end the header and start another (or end the action).
    if "\r" in value or "\n" in value:
        raise ValueError("{} must not contain a line break".format(what))


def _check_header(key: str, value: str) -> None:
    _check_header_value("AMI header {}".format(key), value)
    # Asterisk splits a Variable header on commas into several NAME=value assignments, so a
    # comma in a value would set channel variables of the sender's choosing.
    if key.lower() == "variable" and "," in value:
        raise ValueError("AMI header {} must not contain a comma".format(key))


class AmiProtocol(LineReceiver):
    """
    The Asterisk Manager Interface framing, client side.

    Asterisk first sends one banner line (C{Asterisk Call Manager/5.0.4}); after that every
    message is a block of C{Key: Value} lines ended by an empty line. A block with C{Event}
    is an event; one with C{Response} answers the action whose C{ActionID} it echoes.
    Messages are dicts keyed by the lower-cased header name.

    @ivar banner: the banner line, once received.
    @ivar ready: fires with the banner; fails if the connection ends before it.
    @ivar on_event: called with each event message.
    @ivar on_lost: called with the reason when the connection ends.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 65536
    BANNER_PREFIX = "Asterisk Call Manager/"
    log = Logger()

    def __init__(self, action_ids: Iterable[str] | None = None):
        self.banner: str | None = None
        self.ready: Deferred = Deferred()
        self.on_event: Callable[[dict], None] = lambda message: None
        self.on_lost: Callable[[Failure], None] = lambda reason: None
        self._action_ids = iter(action_ids) if action_ids is not None else (
            "{}-{}".format(_uuid.uuid4().hex[:8], n) for n in itertools.count(1)
        )
        self._block: dict[str, str] = {}
        self._pending: dict[str, Deferred] = {}

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self.banner is None:
            if not text.startswith(self.BANNER_PREFIX):
                self.log.error("not an Asterisk Manager Interface: banner {banner!r}", banner=text)
                self.transport.loseConnection()
                return
            self.banner = text
            self.ready.callback(text)
            return
        if not text:
            if self._block:
                message, self._block = self._block, {}
                self._dispatch(message)
            return
        key, sep, value = text.partition(":")
        if sep:
            self._block[key.strip().lower()] = value.strip()
        else:
            # Output of a "Response: Follows" command: kept, though no action here uses it.
            previous = self._block.get("output")
            self._block["output"] = text if previous is None else previous + "\n" + text

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log.error("AMI line longer than {max} bytes; disconnecting", max=self.MAX_LENGTH)
        self.transport.loseConnection()

    def _dispatch(self, message: dict) -> None:
        if "event" in message:
            self.on_event(message)
            return
        pending = self._pending.pop(message.get("actionid", ""), None)
        if pending is None:
            self.log.debug("AMI message for no pending action: {keys}", keys=sorted(message))
            return
        pending.callback(message)

    def send_action(
        self, action: str, headers: Iterable[tuple[str, str]], action_id: str | None = None
    ) -> Deferred:
        """
        Send one action as a single write.

        @param headers: C{(key, value)} pairs in order; a key may repeat (C{Variable}).
        @return: a Deferred firing with the response message, whatever its C{Response}
            value; failing with the reason if the connection ends first. Cancelling it
            forgets the action (a later response is ignored).
        @raise ValueError: a value contains a line break, or a C{Variable} value a comma;
            nothing is sent.
        """
        if action_id is None:
            action_id = next(self._action_ids)
        lines = [("Action", action), ("ActionID", action_id), *headers]
        for key, value in lines:
            _check_header(key, value)
        payload = "".join("{}: {}\r\n".format(k, v) for k, v in lines) + "\r\n"
        d = Deferred(lambda _: self._pending.pop(action_id, None))
        self._pending[action_id] = d
        self.transport.write(payload.encode("utf-8"))
        return d

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(reason)
        if not self.ready.called:
            self.ready.errback(reason)
        self.on_lost(reason)


# Asterisk's OriginateResponse "Reason" is the last AST_CONTROL_* frame the channel saw.
_ORIGINATE_REASONS = {
    "0": ("unreachable", "no such extension or number, or the channel could not be created"),
    "1": ("no_answer", "hung up before answering"),
    "3": ("no_answer", "rang without answer until the timeout"),
    "5": ("busy", "busy"),
    "8": ("congestion", "congestion"),
}


@attrs.define(eq=False, repr=False)
class _Attempt:
    request: DialRequest
    protocol: AmiProtocol
    result: Deferred
    guard: object = None
    response: Deferred | None = None


@attrs.define(eq=False, repr=False)
class _Channel:
    """An originated channel that L{AmiDialer.cancel} may have to hang up."""

    leg_uuid: str
    channel_id: str
    action_id: str
    #: reactor seconds after which it is forgotten (past any ring window).
    until: float
    #: Asterisk's Newchannel event for it was seen: it exists.
    created: bool = False
    cancelled: bool = False


class _AmiFactory(Factory):
    def __init__(self, dialer: "AmiDialer"):
        self._dialer = dialer

    def buildProtocol(self, addr):
        protocol = AmiProtocol(self._dialer._action_ids)
        protocol.factory = self
        self._dialer._connected(protocol)
        return protocol


@implementer(IDialer)
class AmiDialer(Service):
    """
    Originates the resident's call through the Asterisk Manager Interface.

    A L{ClientService} keeps one connection, reconnecting with backoff; each connection logs
    in (C{Events: call}, needed for C{OriginateResponse}). A refused login is logged and
    retried with a growing delay. L{dial} sends an async C{Originate} and fires when
    Asterisk's C{OriginateResponse} reports the resident answered, or fails with the reason
    it gives. Add it to the service tree: it connects at start and disconnects at stop.
    """

    name = "ami"
    log = Logger()

    # If Asterisk never sends OriginateResponse, give up this long after the ring timeout.
    GRACE_S = 15.0

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        context: str = "audiosocket-resident",
        reactor=None,
        retry_policy: Callable[[int], float] | None = None,
    ):
        for what, value in (("AMI host", host), ("AMI username", username),
                            ("AMI context", context)):
            if not isinstance(value, str) or not value:
                raise ValueError("{} must be a non-empty string".format(what))
            _check_header_value(what, value)
        if not isinstance(secret, str):
            raise ValueError("AMI secret must be a string")
        _check_header_value("AMI secret", secret)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(
                "AMI port must be an integer between 1 and 65535, not {!r}".format(port)
            )
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self.host = host
        self.port = port
        self.username = username
        self._secret = secret
        self.context = context
        self._action_ids = (
            "audiosocket-{}-{}".format(_uuid.uuid4().hex[:8], n) for n in itertools.count(1)
        )
        self._protocol: AmiProtocol | None = None
        self._attempts: dict[str, _Attempt] = {}
        #: Originated channels, by leg UUID, channel uniqueid and Originate ActionID.
        self._channels: dict[str, _Channel] = {}
        self._by_channel_id: dict[str, _Channel] = {}
        self._by_action: dict[str, _Channel] = {}
        self._ready_waiters: list[Deferred] = []
        self._login_failures = 0
        self._stopping = False
        self.factory = _AmiFactory(self)
        policy = retry_policy if retry_policy is not None else backoffPolicy()
        # ClientService resets its failure count on every TCP connect, so a refused login
        # would be retried at the first delay forever; count login failures in as well.
        self._client = ClientService(
            HostnameEndpoint(reactor, host, port, timeout=10),
            self.factory,
            retryPolicy=lambda failures: policy(failures + self._login_failures),
            clock=reactor,
        )

    def __repr__(self):
        return "<AmiDialer {}@{}:{}>".format(self.username, self.host, self.port)

    # -- service -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Connected and logged in."""
        return self._protocol is not None

    @property
    def pending(self) -> int:
        """Originate attempts waiting for their outcome."""
        return len(self._attempts)

    def when_ready(self) -> Deferred:
        """A Deferred firing once connected and logged in (at once if already)."""
        if self._protocol is not None:
            return succeed(None)
        d = Deferred(lambda d: self._ready_waiters.remove(d))
        self._ready_waiters.append(d)
        return d

    def startService(self):
        super().startService()
        self._stopping = False
        self._client.startService()

    def stopService(self):
        super().stopService()
        self._stopping = True
        for channel in list(self._channels.values()):
            self._drop(channel)
        return self._client.stopService()

    # -- connection --------------------------------------------------------------------------

    def _connected(self, protocol: AmiProtocol) -> None:
        protocol.on_event = self._event
        protocol.on_lost = lambda reason: self._lost(protocol, reason)
        d = Deferred.fromCoroutine(self._login(protocol))
        d.addErrback(lambda f: self.log.failure("AMI login to {host}:{port} failed",
                                                f, host=self.host, port=self.port))

    async def _login(self, protocol: AmiProtocol) -> None:
        try:
            await protocol.ready
            response = await protocol.send_action(
                "Login",
                [("Username", self.username), ("Secret", self._secret), ("Events", "call")],
            )
        except (error.ConnectionDone, error.ConnectionLost):
            return
        if response.get("response", "").lower() != "success":
            self._login_failures += 1
            self.log.error(
                "AMI login as {username} to {host}:{port} refused: {message}; "
                "retrying with backoff (failure {count})",
                username=self.username,
                host=self.host,
                port=self.port,
                message=response.get("message", "no message"),
                count=self._login_failures,
            )
            protocol.transport.loseConnection()
            return
        self._login_failures = 0
        self._protocol = protocol
        self.log.info(
            "AMI logged in as {username} to {host}:{port} ({banner})",
            username=self.username,
            host=self.host,
            port=self.port,
            banner=protocol.banner,
        )
        self._hangup_cancelled()
        waiters, self._ready_waiters = self._ready_waiters, []
        for w in waiters:
            w.callback(None)

    def _hangup_cancelled(self) -> None:
        """
        Logged in (again): hang up every channel cancelled while the connection was down or
        whose hangup the lost connection left unanswered (the Newchannel events it missed
        included). A channel already gone answers "No such channel": nothing more is done.
        """
        self._forget_old(self._reactor.seconds())
        for channel in [c for c in self._channels.values() if c.cancelled]:
            self._hangup(channel)

    def _lost(self, protocol: AmiProtocol, reason: Failure) -> None:
        if protocol is self._protocol:
            self._protocol = None
            (self.log.info if self._stopping else self.log.warn)(
                "AMI connection to {host}:{port} closed: {reason}",
                host=self.host,
                port=self.port,
                reason=reason.getErrorMessage(),
            )
        for action_id, attempt in list(self._attempts.items()):
            if attempt.protocol is protocol:
                self._finish(
                    action_id,
                    DialFailed("unreachable", "AMI connection lost while originating"),
                )

    # -- dialing -----------------------------------------------------------------------------

    def dial(self, request: DialRequest) -> Deferred:
        protocol = self._protocol
        if protocol is None:
            return fail(DialFailed(
                "unreachable",
                "not connected to the Asterisk Manager at {}:{}".format(self.host, self.port),
            ))
        # Our own uniqueid for the channel, so cancel() can name it from the start; random,
        # not the leg UUID (a uniqueid shows in CDRs and AMI events; a credential must not).
        channel_id = "audiosocket-{}".format(_uuid.uuid4().hex)
        headers = [
            ("Channel", request.dial),
            ("Context", self.context),
            ("Exten", "s"),
            ("Priority", "1"),
            ("Async", "true"),
            ("Timeout", str(int(round(request.timeout_s * 1000)))),
            ("CallerID", request.return_extension),
            ("ChannelId", channel_id),
            ("OtherChannelId", channel_id + "-2"),  # a Local channel's ;2 half
            # The dialplan's AudioSocket(${AUDIOSOCKET_UUID},...) presents this to the return
            # port: the dial's own leg UUID, never the visitor's session UUID.
            ("Variable", "AUDIOSOCKET_UUID={}".format(request.leg_uuid)),
            ("Variable", "AUDIOSOCKET_HOST={}".format(request.audiosocket)),
            ("Variable", "AUDIOSOCKET_SESSION={}".format(request.uuid)),
        ]
        try:
            for key, value in headers:
                _check_header(key, value)
        except ValueError as e:
            self.log.warn(
                "refusing to originate {dial} for session {uuid}: {why}",
                dial=request.dial,
                uuid=request.uuid,
                why=str(e),
            )
            return fail(DialFailed("rejected", "refused before sending: {}".format(e)))
        action_id = next(self._action_ids)
        now = self._reactor.seconds()
        self._forget_old(now)
        self._remember(_Channel(
            request.leg_uuid, channel_id, action_id, now + request.timeout_s + self.GRACE_S
        ))
        result = Deferred(lambda _: self._forget(action_id))
        attempt = _Attempt(request, protocol, result)
        self._attempts[action_id] = attempt
        attempt.guard = self._reactor.callLater(
            request.timeout_s + self.GRACE_S,
            self._finish,
            action_id,
            DialFailed("timeout", "Asterisk sent no OriginateResponse"),
        )
        attempt.response = protocol.send_action("Originate", headers, action_id=action_id)
        attempt.response.addCallbacks(
            lambda message: self._originate_answered(action_id, message),
            lambda failure: None,  # connection loss is handled by _lost
        )
        self.log.info(
            "AMI originate {action_id}: {dial} as channel {channel_id} for session {uuid} "
            "(leg {leg_uuid}), back to {audiosocket}",
            action_id=action_id,
            channel_id=channel_id,
            dial=request.dial,
            uuid=request.uuid,
            leg_uuid=request.leg_uuid,
            audiosocket=request.audiosocket,
        )
        return result

    def _originate_answered(self, action_id: str, message: dict) -> None:
        if message.get("response", "").lower() == "success":
            return  # queued; the outcome comes as OriginateResponse
        channel = self._by_action.get(action_id)
        if channel is not None:
            self._drop(channel)  # refused: no channel was made
        self._finish(
            action_id,
            DialFailed(
                "rejected",
                "Asterisk refused Originate: {}".format(message.get("message", "no message")),
            ),
        )

    def _event(self, message: dict) -> None:
        name = message.get("event", "").lower()
        if name == "newchannel":
            channel = self._by_channel_id.get(message.get("uniqueid", ""))
            if channel is not None:
                channel.created = True
                if channel.cancelled:
                    # Cancelled before Asterisk had made it: hang it up now it exists.
                    self._hangup(channel)
            return
        if name == "hangup":
            channel = self._by_channel_id.get(message.get("uniqueid", ""))
            if channel is not None:
                self._drop(channel)  # gone: nothing left to cancel
            return
        if name != "originateresponse":
            return
        action_id = message.get("actionid", "")
        answered = message.get("response", "").lower() == "success"
        channel = self._by_action.get(action_id)
        if channel is not None:
            if not answered:
                self._drop(channel)  # failed: the channel is gone (or never was)
            elif channel.cancelled:
                self._hangup(channel)  # answered after all: hang up what was cancelled
        if action_id not in self._attempts:
            return
        if answered:
            self._finish(action_id, None)
            return
        code = message.get("reason", "")
        reason, text = _ORIGINATE_REASONS.get(code, ("error", "failed"))
        self._finish(
            action_id,
            DialFailed(reason, "Asterisk could not call {}: {} (reason {})".format(
                self._attempts[action_id].request.dial, text, code or "missing")),
        )

    def _forget(self, action_id: str) -> _Attempt | None:
        attempt = self._attempts.pop(action_id, None)
        if attempt is not None:
            if attempt.guard is not None and attempt.guard.active():
                attempt.guard.cancel()
            if attempt.response is not None and not attempt.response.called:
                attempt.response.cancel()
        return attempt

    # -- cancelling --------------------------------------------------------------------------

    def cancel(self, leg_uuid: str) -> Deferred:
        """
        Hang up the channel originated for C{leg_uuid} (see the module docstring). Fires
        L{None} once Asterisk has answered the C{Hangup} (or at once when there is nothing
        to hang up); never fails.
        """
        self._forget_old(self._reactor.seconds())
        channel = self._channels.get(leg_uuid)
        if channel is None or channel.cancelled:
            return succeed(None)  # unknown, over, or already cancelled
        channel.cancelled = True
        return self._hangup(channel)

    def _hangup(self, channel: _Channel) -> Deferred:
        protocol = self._protocol
        if protocol is None:
            # Asterisk keeps ringing a call it originated whatever happens to the AMI
            # connection: the Hangup goes out once logged in again (L{_hangup_cancelled}),
            # unless the channel's ring window has passed by then.
            self.log.warn(
                "cannot hang up channel {channel_id} (leg {leg_uuid}) now: not connected to "
                "the Asterisk Manager at {host}:{port}; hanging it up once reconnected",
                channel_id=channel.channel_id,
                leg_uuid=channel.leg_uuid,
                host=self.host,
                port=self.port,
            )
            return succeed(None)
        d = protocol.send_action("Hangup", [("Channel", channel.channel_id)])

        def answered(message: dict) -> None:
            text = message.get("message", "no message")
            if message.get("response", "").lower() == "success":
                self.log.info(
                    "AMI hung up channel {channel_id}: dial of leg {leg_uuid} cancelled",
                    channel_id=channel.channel_id,
                    leg_uuid=channel.leg_uuid,
                )
                self._drop(channel)
            elif "no such channel" not in text.lower():
                self.log.error(
                    "AMI refused to hang up channel {channel_id} (leg {leg_uuid}): {message}; "
                    "it rings until its timeout (the AMI user needs write = call for Hangup)",
                    channel_id=channel.channel_id,
                    leg_uuid=channel.leg_uuid,
                    message=text,
                )
                self._drop(channel)
            elif channel.created:
                self._drop(channel)  # it existed, and no longer does: gone by itself
            else:
                # Not made yet (the Originate runs in its own thread): hung up on Newchannel.
                self.log.info(
                    "AMI channel {channel_id} (leg {leg_uuid}) does not exist yet; it is hung "
                    "up when Asterisk creates it",
                    channel_id=channel.channel_id,
                    leg_uuid=channel.leg_uuid,
                )

        def failed(failure: Failure) -> None:
            if failure.check(error.ConnectionDone, error.ConnectionLost) and not self._stopping:
                self.log.warn(
                    "AMI connection lost before Asterisk answered the hangup of channel "
                    "{channel_id} (leg {leg_uuid}); sending it again once reconnected",
                    channel_id=channel.channel_id,
                    leg_uuid=channel.leg_uuid,
                )
                return
            self.log.warn(
                "AMI hangup of channel {channel_id} (leg {leg_uuid}) failed: {why}",
                channel_id=channel.channel_id,
                leg_uuid=channel.leg_uuid,
                why=failure.getErrorMessage(),
            )
            self._drop(channel)

        return d.addCallbacks(answered, failed)

    # -- hand-off ----------------------------------------------------------------------------

    def notify(self, event: dict) -> Deferred:
        return _log_notice(self.log, event)

    def handoff(self, uuid: str, action: str, argument: str) -> Deferred:
        """
        C{DBPut} of C{action,argument} under C{audiosocket/<uuid>} (see the module
        docstring). Cancelling the Deferred forgets the action.
        """
        try:
            check_handoff(uuid, action, argument)
        except ValueError as e:
            return fail(e)
        protocol = self._protocol
        if protocol is None:
            return fail(HandoffFailed(
                "not connected to the Asterisk Manager at {}:{}".format(self.host, self.port)
            ))
        value = "{},{}".format(action, argument)
        d = protocol.send_action(
            "DBPut", [("Family", "audiosocket"), ("Key", uuid), ("Val", value)]
        )

        def answered(message: dict) -> None:
            if message.get("response", "").lower() != "success":
                text = message.get("message", "no message")
                self.log.error(
                    "AMI refused DBPut for call {uuid}: {message} (the AMI user needs "
                    "write = system)",
                    uuid=uuid,
                    message=text,
                )
                raise HandoffFailed("Asterisk refused DBPut: {}".format(text))
            self.log.info(
                "AMI stored {action} for call {uuid}", action=action, uuid=uuid
            )

        def lost(failure: Failure) -> Failure:
            if failure.check(defer.CancelledError, HandoffFailed):
                return failure
            return Failure(HandoffFailed(
                "AMI connection lost: {}".format(failure.getErrorMessage())
            ))

        return d.addCallback(answered).addErrback(lost)

    def _remember(self, channel: _Channel) -> None:
        self._channels[channel.leg_uuid] = channel
        self._by_channel_id[channel.channel_id] = channel
        self._by_action[channel.action_id] = channel

    def _drop(self, channel: _Channel) -> None:
        if self._channels.get(channel.leg_uuid) is channel:
            del self._channels[channel.leg_uuid]
        self._by_channel_id.pop(channel.channel_id, None)
        self._by_action.pop(channel.action_id, None)

    def _forget_old(self, now: float) -> None:
        for channel in [c for c in self._channels.values() if c.until <= now]:
            self._drop(channel)

    def _finish(self, action_id: str, outcome: DialFailed | None) -> None:
        attempt = self._forget(action_id)
        if attempt is None:
            return
        if outcome is None:
            self.log.info(
                "AMI originate {action_id}: {dial} answered", action_id=action_id,
                dial=attempt.request.dial,
            )
            attempt.result.callback(None)
        else:
            self.log.warn(
                "AMI originate {action_id}: {dial} failed: {why}", action_id=action_id,
                dial=attempt.request.dial, why=outcome,
            )
            attempt.result.errback(outcome)


# -- wiring ----------------------------------------------------------------------------------


def make_dialer(dialer_config, secret_lookup: Callable[[str], str | None], *, reactor=None):
    """
    Build the dialer C{[dialer]} asks for.

    @param dialer_config: an L{audiosocket.config.DialerConfig}.
    @param secret_lookup: maps an environment variable name to its value (C{os.environ.get}).
    @return: an L{IDialer}; the AMI one is also an C{IService} to add to the service tree.
    @raise ValueError: naming the setting that is missing or wrong.
    """
    kind = dialer_config.kind
    if kind == "log":
        return LogDialer()
    if kind == "http":
        if not dialer_config.url:
            raise ValueError("dialer.url: required when dialer.kind is \"http\"")
        return HttpDialer(dialer_config.url, timeout_s=dialer_config.timeout_s, reactor=reactor)
    if kind == "ami":
        ami = dialer_config.ami
        secret = secret_lookup(ami.secret_env)
        if not secret:
            raise ValueError(
                "dialer.ami.secret_env: environment variable {} is not set".format(
                    ami.secret_env)
            )
        return AmiDialer(
            ami.host, ami.port, ami.username, secret, context=ami.context, reactor=reactor
        )
    raise ValueError("dialer.kind: unknown dialer {!r}".format(kind))
