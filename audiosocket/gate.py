# -*- test-case-name: tests.test_gate,tests.test_flow_gate -*-
"""
Opening a condominium's gate, and the audit entry every open leaves.

A visitor may enter on a resident's decision, a pre-authorisation code, or an operator's
order (C{POST /api/gates/{condominium_id}/open}). What then opens the gate is the
condominium's C{[condominiums.gate]}:

  - C{none}: nothing; the decision is only recorded (no audit entry: nothing was opened).
  - C{dtmf}: gate intercoms open on a DTMF code sent on their line. The visitor's call is
    handed back to the PBX with C{open,<digits>} (the dialer's C{handoff}, see
    L{audiosocket.dialer}); the shipped visitor context, after C{AudioSocket()} returns,
    sends the digits with C{SendDTMF} and hangs up. So the digits reach the intercom after
    the visitor's goodbye, on the visitor's own channel: a visitor who has hung up has no
    channel left, and nothing is sent. The result is C{handed_off} once the PBX has stored
    the instruction (within L{HANDOFF_TIMEOUT_S}). An operator's open without a call has no
    line to send on: it needs the UUID of a call in progress on that condominium.
  - C{http}: a relay controller. C{method} (POST or PUT) to C{url} with the JSON body
    C{{"event": "open", "id", "ts", "condominium_id", "apartment", "uuid",
    "authorized_by", "evidence"}}, C{Content-Type: application/json} and
    C{X-Audiosocket-Signature} under the secret in the environment variable C{secret_env}
    (signed and retried as L{audiosocket.signed} says; L{RETRY_DELAY_S} between tries).
    C{id} is the same on every try of one open and C{ts} is when it was asked (Unix
    seconds): a relay should refuse a C{ts} more than a minute off and an C{id} it has
    already acted on (a replayed request is then harmless). A 2xx answer is C{opened};
    otherwise, once the tries are spent, C{failed}, with the last error.

Every open attempted (C{opened}, C{handed_off}, C{failed}) or withheld (C{not_opened}: the
visitor hung up before the gate could open) is appended to the access audit through
C{audit(entry)} with: C{condominium_id}, C{gate} (the kind), C{extension_id}, C{uuid},
C{apartment}, C{visitor}, C{authorized_by} (C{resident}, C{preauth}, C{operator}), C{who}
(the resident, the pre-authorisation's id, the operator's reason), C{evidence} (C{dtmf:1},
C{voice}, C{code}, C{operator:<reason>}), C{result}, C{error}, C{attempts}. The gate's
digits and the relay's secret never appear in a log line, an audit entry or a record.
"""

from __future__ import annotations

import collections
import re
import uuid as _uuid
from typing import Any, Callable

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger

from audiosocket.config import GateConfig
from audiosocket.model import InvalidField
from audiosocket.reactors import default_reactor
from audiosocket.signed import encode, post_signed

#: How long the PBX may take to acknowledge the C{open} hand-off.
HANDOFF_TIMEOUT_S = 3.0
#: Pause between two tries of a relay call.
RETRY_DELAY_S = 0.5

RESULTS = ("opened", "handed_off", "failed", "not_opened")
AUTHORIZED_BY = ("resident", "preauth", "operator")


class GateError(Exception):
    """An open that cannot be asked for at all (no gate, a dtmf gate without a call)."""


@frozen(kw_only=True)
class OpenRequest:
    """Who lets whom in through which condominium's gate, and on what evidence."""

    condominium_id: int
    authorized_by: str
    evidence: str
    who: str | None = None
    uuid: str | None = None  # the visitor's call (a dtmf gate opens on its channel)
    extension_id: int | None = None
    apartment: str | None = None
    visitor: str | None = None

    def __attrs_post_init__(self):
        if self.authorized_by not in AUTHORIZED_BY:
            raise ValueError("authorized_by must be one of {}".format(AUTHORIZED_BY))


@frozen
class OpenResult:
    result: str
    error: str | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.result in ("opened", "handed_off")

    def to_dict(self) -> dict:
        return {"result": self.result, "error": self.error, "attempts": self.attempts}


class GateOpener:
    """
    Opens gates (L{open}) and audits each open. One for the server; the gate settings
    come with each call (a reload applies to the next open).

    @param dialer: the L{audiosocket.dialer.IDialer} whose C{handoff} serves C{dtmf} gates.
    @param http: a treq C{HTTPClient} for C{http} gates.
    @param secret: C{secret(env_name) -> value or None}, read at each open.
    @param audit: C{audit(entry: dict)}: appends to the access audit; never fails.
    """

    log = Logger()

    def __init__(
        self,
        *,
        dialer,
        http,
        secret: Callable[[str], str | None],
        audit: Callable[[dict], Any] = lambda entry: None,
        reactor=None,
        retry_delay_s: float = RETRY_DELAY_S,
    ):
        self._dialer = dialer
        self._http = http
        self._secret = secret
        self._audit = audit
        self._reactor = default_reactor(reactor)
        self._retry_delay_s = retry_delay_s
        #: (condominium id, authorized_by, result) → openings so far (the metric).
        self.counts: collections.Counter = collections.Counter()

    def open(self, gate: GateConfig, request: OpenRequest) -> defer.Deferred:
        """
        Open C{gate} for C{request}; fires with an L{OpenResult} (never fails: a failure is
        a result, audited), or fails with L{GateError} when there is nothing to ask.
        """
        if gate.kind == "none":
            return defer.fail(GateError("condominium {} has no gate".format(request.condominium_id)))
        if gate.kind == "dtmf" and not request.uuid:
            return defer.fail(GateError(
                "a dtmf gate opens on a visitor's call: give the uuid of a call in progress"
            ))
        return defer.Deferred.fromCoroutine(self._open(gate, request))

    def withheld(self, gate: GateConfig, request: OpenRequest, why: str) -> OpenResult:
        """An open decided but not attempted (the visitor left first): audited as such."""
        result = OpenResult("not_opened", why, 0)
        self._record(gate, request, result)
        return result

    async def _open(self, gate: GateConfig, request: OpenRequest) -> OpenResult:
        if gate.kind == "dtmf":
            result = await self._handoff(gate, request)
        else:
            result = await self._relay(gate, request)
        self._record(gate, request, result)
        return result

    def _record(self, gate: GateConfig, request: OpenRequest, result: OpenResult) -> None:
        self.counts[(request.condominium_id, request.authorized_by, result.result)] += 1
        entry = {
            "condominium_id": request.condominium_id,
            "gate": gate.kind,
            "extension_id": request.extension_id,
            "uuid": request.uuid,
            "apartment": request.apartment,
            "visitor": request.visitor,
            "authorized_by": request.authorized_by,
            "who": request.who,
            "evidence": request.evidence,
            **result.to_dict(),
        }
        log = self.log.info if result.ok else self.log.warn
        log(
            "gate of condominium {condominium_id} ({gate}) for apartment {apartment}, "
            "authorized by {authorized_by} ({evidence}): {result}{error}",
            condominium_id=request.condominium_id,
            gate=gate.kind,
            apartment=request.apartment,
            authorized_by=request.authorized_by,
            evidence=request.evidence,
            result=result.result,
            error=" ({})".format(result.error) if result.error else "",
            uuid=request.uuid,
        )
        try:
            self._audit(entry)
        except Exception:
            self.log.failure("the access audit refused an entry")

    async def _handoff(self, gate: GateConfig, request: OpenRequest) -> OpenResult:
        d = defer.maybeDeferred(self._dialer.handoff, request.uuid, "open", gate.digits)
        d.addTimeout(HANDOFF_TIMEOUT_S, self._reactor)
        try:
            await d
        except defer.TimeoutError:
            return OpenResult("failed", "the PBX did not answer within {} s".format(HANDOFF_TIMEOUT_S), 1)
        except Exception as e:
            return OpenResult("failed", str(e) or type(e).__name__, 1)
        return OpenResult("handed_off", None, 1)

    async def _relay(self, gate: GateConfig, request: OpenRequest) -> OpenResult:
        secret = self._secret(gate.secret_env) if gate.secret_env else None
        if not secret:
            return OpenResult(
                "failed", "the relay's secret ({}) is not set".format(gate.secret_env or "none"), 0
            )
        body = encode(
            {
                "event": "open",
                "id": _uuid.uuid4().hex,
                "ts": round(self._reactor.seconds(), 3),
                "condominium_id": request.condominium_id,
                "apartment": request.apartment,
                "uuid": request.uuid,
                "authorized_by": request.authorized_by,
                "evidence": request.evidence,
            }
        )
        delivery = await post_signed(
            self._http,
            gate.url,
            body,
            secret=secret,
            reactor=self._reactor,
            timeout_s=gate.timeout_s,
            retries=gate.retries,
            delay_s=lambda n: self._retry_delay_s,
            method=gate.method,
        )
        if delivery.ok:
            return OpenResult("opened", None, delivery.attempts)
        error = delivery.error
        if error and error.startswith("answered "):
            error = "the relay " + error
        return OpenResult("failed", error, delivery.attempts)


#: The longest reason an operator may give for an open (kept in the audit).
MAX_REASON_CHARS = 200
_APARTMENT = re.compile(r"[0-9A-Za-z-]{1,16}")


class OperatorDesk:
    """
    Opens by hand (C{POST /api/gates/{condominium_id}/open}): the operator says why
    (C{reason}, kept in the audit as evidence C{operator:<reason>}), and may name a call in
    progress on that condominium (C{uuid}) and the apartment. A C{dtmf} gate opens on a
    call's line, so it needs the call: the instruction is handed to the PBX, then the call is
    ended (both legs hear a short goodbye) and the dialplan sends the digits. An C{http}
    gate opens at once; a call named is only linked in the audit.

    @param site: C{site(condominium_id) -> Site}, raising C{KeyError} for an unknown one.
    @param sessions: the L{audiosocket.session.SessionRegistry} (C{find}, C{hangup}).
    """

    log = Logger()

    def __init__(self, opener: GateOpener, *, site: Callable[[int], Any], sessions):
        self._opener = opener
        self._site = site
        self._sessions = sessions

    def open(self, condominium_id: int, body: dict) -> defer.Deferred:
        """
        Fires with the L{OpenResult}; fails with C{KeyError} (no such condominium, or no
        such call on it), L{InvalidField} (a bad body) or L{GateError} (no gate; a dtmf gate
        without a call).
        """
        return defer.Deferred.fromCoroutine(self._open(condominium_id, body))

    async def _open(self, condominium_id: int, body: dict) -> OpenResult:
        site = self._site(condominium_id)
        unknown = set(body) - {"reason", "uuid", "apartment"}
        if unknown:
            raise InvalidField(sorted(unknown)[0], "unknown field (allowed: reason, uuid, apartment)")
        reason = body.get("reason")
        if (
            not isinstance(reason, str)
            or not reason.strip()
            or len(reason) > MAX_REASON_CHARS
            or not reason.isprintable()
        ):
            raise InvalidField(
                "reason", "must be a non-empty line of at most {} characters".format(MAX_REASON_CHARS)
            )
        apartment = body.get("apartment")
        if apartment is not None and (not isinstance(apartment, str) or not _APARTMENT.fullmatch(apartment)):
            raise InvalidField("apartment", "must be an apartment number (up to 16 letters and digits)")
        session = None
        uuid = body.get("uuid")
        if uuid is not None:
            session = self._sessions.find(uuid) if isinstance(uuid, str) else None
            if session is None or session.extension.condominium_id != condominium_id:
                raise KeyError("no call {} in progress on condominium {}".format(uuid, condominium_id))
        gate = site.gate
        facts = session.facts if session is not None else None
        request = OpenRequest(
            condominium_id=condominium_id,
            authorized_by="operator",
            evidence="operator:" + reason.strip(),
            who=reason.strip(),
            uuid=str(session.uuid) if session is not None else None,
            extension_id=session.extension.id if session is not None else None,
            apartment=apartment or (facts.apartment if facts is not None else None),
            visitor=facts.visitor_name if facts is not None else None,
        )
        result = await self._opener.open(gate, request)
        if session is not None:
            session.note_gate(kind=gate.kind, by="operator", **result.to_dict())
            if gate.kind == "dtmf" and result.ok:
                # The digits go on the visitor's line once our audio ends: end the call.
                d = self._sessions.hangup(str(session.uuid))
                d.addErrback(lambda f: self.log.failure("ending call {uuid} after an open", f, uuid=str(session.uuid)))
        return result
