"""
C{audiosocket-fake-pbx}: the dialer's other end, for trying a whole call without Asterisk.

It serves the HTTP dialer's webhook (C{[dialer] kind = "http"}, C{url =
"http://127.0.0.1:9000/"}). On each POST it does what Asterisk's dialplan does once the
resident answers: it connects an AudioSocket leg to the request's C{audiosocket} address with
the request's C{leg_uuid} (the dial's own UUID: the return port refuses the visitor's session
C{uuid}), then presses the keys it was told (C{--dtmf 2:1} presses 1 two seconds in) or
streams a WAV, and prints what the resident's leg heard. With C{--ring S} the resident
answers only after S seconds of ringing.

It honours the dialer's cancel (C{{"event": "cancel", "uuid", "leg_uuid"}}, sent when the
server no longer expects that leg: the visitor hung up, the ring window passed): a phone still
ringing is not answered, a leg already connected is hung up. A cancel for a leg it does not
know is answered 200 all the same (cancel is idempotent).

Several residents, each their own phone: C{--phone DIAL=SPEC} (repeatable) says what the
phone rung with that dial string does; SPEC is comma-separated items: C{busy} (the webhook
answers HTTP 486 C{{"reason": "busy"}}, a failed dial), C{noanswer} (it rings until the
request's C{timeout_s} or a cancel), C{ring:S} (answers after S seconds), C{dtmf:S:DIGITS}
(presses DIGITS S seconds after answering), C{seconds:S} (hangs up after S seconds). Phones
not listed do what the global options say.

The operator: the server's hand-off (C{{"event": "transfer", "uuid", "dial"}}, or C{"open"}
with C{"digits"}) is answered 200 and printed ("transferring call ... to the operator at
..."), as Asterisk would store it for the dialplan; C{--refuse-handoff} answers 403 instead
(Asterisk's "Permission denied").

    audiosocket-fake-pbx --listen 9000 --dtmf 2:1
    audiosocket-fake-pbx --phone SIP/ana=busy --phone SIP/carlos=ring:3,dtmf:2:1
"""

from __future__ import annotations

import argparse
import json
import sys

import attrs

from twisted.internet import defer, task
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import resource, server

from audiosocket.callclient import CallOptions, CallTracker, place_call


@attrs.frozen
class PhoneSpec:
    """What one resident's phone does when rung (see the module docstring)."""

    busy: bool = False
    answer: bool = True
    ring_s: float = 0.0
    dtmf: tuple = ()
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> "PhoneSpec":
        """C{"busy"}, C{"noanswer"}, C{"ring:3,dtmf:2:1,seconds:20"}. @raise ValueError"""
        values: dict = {}
        dtmf = []
        for item in text.split(","):
            name, _, rest = item.strip().partition(":")
            if name == "busy" and not rest:
                values["busy"] = True
            elif name == "noanswer" and not rest:
                values["answer"] = False
            elif name == "ring":
                values["ring_s"] = float(rest)
            elif name == "seconds":
                values["seconds"] = float(rest)
            elif name == "dtmf":
                at, _, digits = rest.partition(":")
                if not digits:
                    raise ValueError("dtmf:SECONDS:DIGITS, not {!r}".format(item))
                dtmf.append((float(at), digits))
            else:
                raise ValueError("unknown phone behaviour {!r}".format(item))
        return cls(dtmf=tuple(dtmf), **values)


class Webhook(resource.Resource):
    """Answers the dialer's POST with 200 and places the resident's call."""

    isLeaf = True
    log = Logger()

    def __init__(
        self, reactor, *, dtmf=(), wav=None, wav_at=0.0, seconds=60.0, ring_s=0.0,
        out=sys.stdout, phones=None, refuse_handoff=False,
    ):
        super().__init__()
        self._reactor = reactor
        self._dtmf = tuple(dtmf)
        self._wav = wav
        self._wav_at = wav_at
        self._seconds = seconds
        self._ring_s = ring_s
        self._out = out
        #: The requests received, and a Deferred of each resident call's report (L{None}
        #: for a call cancelled before it was answered).
        self.requests: list[dict] = []
        self.calls: list[defer.Deferred] = []
        #: The cancel events received.
        self.cancels: list[dict] = []
        #: leg_uuid → (the ringing timer's Deferred, the call's tracker), while it lasts.
        self._live: dict[str, tuple[defer.Deferred, CallTracker]] = {}
        #: dial string → L{PhoneSpec}: the residents' phones (others: the options above).
        self._phones: dict[str, PhoneSpec] = dict(phones or {})
        #: The hand-offs received (transfer to the operator, open the gate).
        self.handoffs: list[dict] = []
        #: The notify events received.
        self.notices: list[dict] = []
        self._refuse_handoff = refuse_handoff

    def render_POST(self, request):
        try:
            body = json.loads(request.content.read())
            if isinstance(body, dict) and body.get("event") == "cancel":
                return self._cancel(request, body)
            if isinstance(body, dict) and body.get("event") in ("transfer", "open"):
                return self._handoff(request, body)
            if isinstance(body, dict) and body.get("event") == "notify":
                # A resident told something without a call (a pre-authorised visitor came in).
                self.notices.append(body)
                print("notify apartment {}: {}".format(body.get("apartment"), body.get("kind")),
                      file=self._out, flush=True)
                return b"{}"
            host, port = body["audiosocket"].rsplit(":", 1)
            phone = self._phones.get(body.get("dial"))
            options = CallOptions(
                host=host,
                port=int(port),
                uuid=body["leg_uuid"],
                dtmf=phone.dtmf if phone is not None else self._dtmf,
                wav=self._wav if phone is None else None,
                wav_at=self._wav_at,
                hangup_after=(
                    phone.seconds
                    if phone is not None and phone.seconds is not None
                    else self._seconds
                ),
            )
            ring_s = phone.ring_s if phone is not None else self._ring_s
            if phone is not None and not phone.answer:
                ring_s = float(body.get("timeout_s", 30.0))
        except (ValueError, KeyError, TypeError) as e:
            request.setResponseCode(400)
            return json.dumps({"error": "bad_request", "detail": str(e)}).encode()
        self.requests.append(body)
        if phone is not None and phone.busy:
            print("{} is busy (apartment {}, {})".format(
                body.get("dial"), body.get("apartment"), body.get("resident")),
                file=self._out, flush=True)
            request.setResponseCode(486)
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": "busy", "reason": "busy"}'
        print(
            "ringing {} for apartment {} ({}) → {} with leg UUID {}".format(
                body.get("dial"),
                body.get("apartment"),
                body.get("resident"),
                body["audiosocket"],
                options.uuid,
            ),
            file=self._out,
            flush=True,
        )
        tracker = CallTracker()
        ringing = task.deferLater(self._reactor, ring_s, lambda: None)
        self._live[options.uuid] = (ringing, tracker)

        def answered(_):
            if phone is not None and not phone.answer:
                print("{} rang unanswered: leg {}".format(body.get("dial"), options.uuid),
                      file=self._out, flush=True)
                return None
            return defer.Deferred.fromCoroutine(
                place_call(options, self._reactor, tracker=tracker)
            ).addCallback(self._done)

        def not_answered(failure):
            failure.trap(defer.CancelledError)
            print("cancelled before answering: leg {}".format(options.uuid), file=self._out,
                  flush=True)
            return None

        d = ringing.addCallbacks(answered, not_answered)
        d.addBoth(self._over, options.uuid, tracker)
        self.calls.append(d)
        request.setHeader(b"content-type", b"application/json")
        return b'{"accepted": true}'

    def _over(self, result, leg_uuid, tracker):
        if self._live.get(leg_uuid, (None, None))[1] is tracker:
            del self._live[leg_uuid]
        return result

    def _cancel(self, request, body):
        leg_uuid = body.get("leg_uuid")
        if not isinstance(leg_uuid, str):
            raise KeyError("leg_uuid")
        self.cancels.append(body)
        live = self._live.pop(leg_uuid, None)
        print("cancel of leg {}: {}".format(
            leg_uuid, "hanging up" if live is not None else "nothing to stop"),
            file=self._out, flush=True)
        if live is not None:
            ringing, tracker = live
            tracker.hang_up_all()  # a connected leg hangs up; one connecting never does
            if not ringing.called:
                ringing.cancel()
        request.setHeader(b"content-type", b"application/json")
        return b'{"cancelled": true}'


    def _handoff(self, request, body):
        action = body["event"]
        argument = body.get("dial" if action == "transfer" else "digits")
        if not isinstance(body.get("uuid"), str) or not isinstance(argument, str):
            raise KeyError("uuid" if not isinstance(body.get("uuid"), str) else "argument")
        request.setHeader(b"content-type", b"application/json")
        if self._refuse_handoff:
            print("refusing the {} of call {}".format(action, body["uuid"]), file=self._out,
                  flush=True)
            request.setResponseCode(403)
            return b'{"error": "permission_denied"}'
        self.handoffs.append(body)
        what = (
            "transferring call {} to the operator at {}"
            if action == "transfer"
            else "call {}: sending {} to open the gate"
        )
        print(what.format(body["uuid"], argument), file=self._out, flush=True)
        return b'{"accepted": true}'

    def _done(self, report):
        print(report.summary(), file=self._out, flush=True)
        return report


def _dtmf(text: str):
    at, _, digits = text.partition(":")
    try:
        return float(at), digits
    except ValueError:
        raise argparse.ArgumentTypeError("expected SECONDS:DIGITS, e.g. 2:1") from None


def _phone(text: str):
    dial, sep, spec = text.rpartition("=")
    if not sep or not dial:
        raise argparse.ArgumentTypeError("expected DIAL=SPEC, e.g. SIP/ana=busy")
    try:
        return dial, PhoneSpec.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="audiosocket-fake-pbx", description=__doc__.split("\n\n")[1])
    parser.add_argument("--listen", default="tcp:9000:interface=127.0.0.1", help="endpoint or port")
    parser.add_argument("--dtmf", type=_dtmf, action="append", default=[], metavar="S:DIGITS")
    parser.add_argument("--wav", help="a WAV the resident says (e.g. 'sim')")
    parser.add_argument("--seconds", type=float, default=60.0, help="hang up after N seconds")
    parser.add_argument("--ring", type=float, default=0.0, help="answer after N seconds")
    parser.add_argument(
        "--phone", type=_phone, action="append", default=[], metavar="DIAL=SPEC",
        help="what the phone rung with DIAL does: busy, noanswer, ring:S, dtmf:S:DIGITS, "
        "seconds:S (comma-separated)",
    )
    parser.add_argument("--refuse-handoff", action="store_true",
                        help="answer the operator hand-off with 403")
    args = parser.parse_args(argv)
    listen = args.listen if ":" in args.listen else "tcp:{}:interface=127.0.0.1".format(args.listen)

    async def run(reactor):
        site = server.Site(Webhook(
            reactor, dtmf=args.dtmf, wav=args.wav, seconds=args.seconds, ring_s=args.ring,
            phones=dict(args.phone), refuse_handoff=args.refuse_handoff))
        port = await serverFromString(reactor, listen).listen(site)
        print("fake PBX webhook on http://127.0.0.1:{}/".format(port.getHost().port), flush=True)
        await defer.Deferred()  # until interrupted

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return 0
