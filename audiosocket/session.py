"""
Sessions: one visitor call, the resident leg that joins it by UUID, its facts and its end.

A visitor leg on an extension's AI port opens a L{Session} keyed by its UUID. The resident's
call comes back on that extension's return port with the same UUID and joins it, but only
while the session's flow is waiting for it (the server originated that call); any other
resident leg is refused. The L{SessionRegistry} is the only place keyed by call: it admits or
turns away visitors (C{max_calls}, per-extension limits), routes resident legs, and when a
session's flow ends it removes every trace of it and hands the call record on.

Turned-away (busy) calls are bounded too, or a flood of calls past C{max_calls} would cost
as much as admitted ones: at most C{max_busy} hear "linhas ocupadas" at once (one more is
closed at once, reason C{busy_overflow}), and each is closed after C{busy_max_s} whatever
it is doing (reason C{busy_timeout}). They also hold a connection each, counted against
the ports' and the peer's connection limits (L{audiosocket.leg}).
"""

from __future__ import annotations

import time
import uuid as _uuid
from typing import Any, Callable

from attrs import define, field
from twisted.internet import defer
from twisted.logger import Logger

from audiosocket.flow.nlu import Facts
from audiosocket.leg import RESIDENT, VISITOR, AudioSocketProtocol, Refused
from audiosocket.model import Extension

OUTCOMES = (
    "authorized",
    "denied",
    "no_decision",
    "no_answer",
    "unknown_apartment",
    "abandoned",
    "busy",
    "error",
)

# Flow states, in the order a call goes through them (shown by the API).
GREETING = "greeting"
COLLECTING = "collecting"
DIALING = "dialing"
ANNOUNCING = "announcing"
DECIDING = "deciding"
FINISHING = "finishing"
ENDED = "ended"


def _leg_info(leg: AudioSocketProtocol | None) -> dict | None:
    if leg is None:
        return None
    peer = leg.peer
    return {
        "role": leg.role,
        "rate": leg.rate,
        "peer": "{}:{}".format(peer.host, peer.port) if hasattr(peer, "host") else str(peer),
        "port": leg.port,
        "closed": leg.closed,
        "frames_in": leg.frames_in,
        "frames_out": leg.stats.frames,
        "late_ticks": leg.stats.late_ticks,
        "max_gap_ms": round(leg.stats.max_gap_ms, 1),
        "hung_up_by": leg.hung_up_by,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@define(eq=False, repr=False)
class Session:
    """
    One visitor call and, once it joins, the resident's leg.

    Times ending in C{_at} are reactor seconds (C{reactor.seconds()}); C{started_wall} is the
    wall-clock start, for the record.
    """

    uuid: _uuid.UUID
    extension: Extension
    visitor: AudioSocketProtocol
    reactor: Any
    busy: bool = False
    #: "host:port" where Asterisk must connect the resident's call (the dial request's
    #: C{audiosocket}): the extension's host and the return port actually bound.
    return_address: str = ""
    resident: AudioSocketProtocol | None = None
    facts: Facts = field(factory=Facts)
    state: str = GREETING
    outcome: str | None = None
    ended_by: str | None = None
    decision_input: str | None = None
    attempts: int = 0
    dial_failures: list = field(factory=list)
    started_at: float = 0.0
    started_wall: float = 0.0
    resident_at: float | None = None
    decided_at: float | None = None
    ended_at: float | None = None
    ended_wall: float | None = None
    flow: defer.Deferred | None = None
    _resident_waiter: defer.Deferred | None = None
    _expecting: bool = False
    _timers: list = field(factory=list)
    _end_waiters: list = field(factory=list)

    log = Logger()

    def __attrs_post_init__(self):
        self.started_at = self.reactor.seconds()
        self.started_wall = time.time()

    # ------------------------------------------------------------ the resident leg

    @property
    def expecting_resident(self) -> bool:
        return self._expecting

    def expect_resident(self) -> defer.Deferred:
        """
        From now on a resident leg with this UUID is admitted. The Deferred fires with it
        when it joins; cancelling it stops waiting (but the session keeps admitting the
        leg until L{stop_expecting}, so a late answer to an earlier attempt still counts).
        """
        self._expecting = True
        if self.resident is not None:
            return defer.succeed(self.resident)
        d = defer.Deferred(lambda _: self._cancel_waiter())
        self._resident_waiter = d
        return d

    def _cancel_waiter(self):
        self._resident_waiter = None

    def stop_expecting(self) -> None:
        self._expecting = False
        waiter, self._resident_waiter = self._resident_waiter, None
        if waiter is not None and not waiter.called:
            waiter.cancel()

    def resident_joined(self, leg: AudioSocketProtocol) -> None:
        self.resident = leg
        self.resident_at = self.reactor.seconds()
        self._expecting = False
        waiter, self._resident_waiter = self._resident_waiter, None
        if waiter is not None:
            waiter.callback(leg)

    # ------------------------------------------------------------ time

    def call_later(self, seconds: float, f: Callable, *args) -> Any:
        """A DelayedCall owned by this session: cancelled when it ends, whatever happens."""
        dc = self.reactor.callLater(seconds, f, *args)
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(dc)
        return dc

    def elapsed(self) -> float:
        return self.reactor.seconds() - self.started_at

    def legs(self) -> list[AudioSocketProtocol]:
        return [leg for leg in (self.visitor, self.resident) if leg is not None]

    # ------------------------------------------------------------ end

    def end(self, by: str) -> None:
        """Stop the flow now (max call time, operator hangup); it says goodbye and hangs up."""
        if self.state in (FINISHING, ENDED):
            return  # already saying goodbye: let it play out
        if self.ended_by is None:
            self.ended_by = by
        if self.flow is not None and not self.flow.called:
            self.flow.cancel()

    def when_ended(self) -> defer.Deferred:
        """A Deferred firing with this session once it has ended and been cleaned up."""
        if self.state == ENDED:
            return defer.succeed(self)
        d = defer.Deferred()
        self._end_waiters.append(d)
        return d

    def finished(self) -> None:
        """Called by the registry once the flow is over: release every timer and waiter."""
        self.state = ENDED
        self.ended_at = self.reactor.seconds()
        self.ended_wall = time.time()
        if self.outcome is None:
            self.outcome = "error"
        self.stop_expecting()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        self.flow = None
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(self)

    # ------------------------------------------------------------ views

    def timings(self) -> dict:
        start = self.started_at
        end = self.ended_at
        return {
            "to_resident_s": _round(self.resident_at - start) if self.resident_at else None,
            "to_decision_s": _round(self.decided_at - start) if self.decided_at else None,
            "total_s": _round((end if end is not None else self.reactor.seconds()) - start),
        }

    def facts_dict(self) -> dict:
        return {
            "intent": self.facts.intent,
            "visitor_name": self.facts.visitor_name,
            "apartment": self.facts.apartment,
            "resident": self.facts.resident_name,
        }

    def describe(self) -> dict:
        """The session as the API shows it."""
        return {
            "uuid": str(self.uuid),
            "extension_id": self.extension.id,
            "condominium_id": self.extension.condominium_id,
            "state": self.state,
            "busy": self.busy,
            "outcome": self.outcome,
            "started_at": _iso(self.started_wall),
            "facts": self.facts_dict(),
            "attempts": self.attempts,
            "legs": {VISITOR: _leg_info(self.visitor), RESIDENT: _leg_info(self.resident)},
            "timings": self.timings(),
        }

    def record(self) -> dict:
        """The call record kept once the session has ended."""
        return {
            "uuid": str(self.uuid),
            "extension_id": self.extension.id,
            "condominium_id": self.extension.condominium_id,
            "started_at": _iso(self.started_wall),
            "ended_at": _iso(self.ended_wall or time.time()),
            "outcome": self.outcome,
            "ended_by": self.ended_by,
            "facts": self.facts_dict(),
            "decision_input": self.decision_input,
            "attempts": self.attempts,
            "dial_failures": list(self.dial_failures),
            "timings": self.timings(),
        }


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + ".{:03d}Z".format(
        int((wall % 1) * 1000)
    )


class SessionRegistry:
    """
    Every session of this process, by UUID.

    @param run_flow: C{run_flow(session) -> Deferred} runs the conversation; it fires when
        the call is over (both legs hung up). It must set C{session.outcome}.
    @param run_busy: the same for a visitor turned away for lack of lines.
    @param max_busy: turned-away calls at once; one more is closed without a word.
    @param busy_max_s: a turned-away call is closed after this long.
    @param on_end: called with each finished session (call records, metrics); errors are
        logged, never raised into the call.
    """

    log = Logger()

    def __init__(
        self,
        *,
        reactor,
        run_flow: Callable[[Session], defer.Deferred],
        run_busy: Callable[[Session], defer.Deferred],
        max_calls: int = 100,
        max_call_s: float = 180.0,
        max_busy: int = 20,
        busy_max_s: float = 15.0,
        on_end: Callable[[Session], Any] | None = None,
        condominium_limit: Callable[[int], int | None] = lambda condominium_id: None,
    ):
        self._reactor = reactor
        self._run_flow = run_flow
        self._run_busy = run_busy
        self.max_calls = max_calls
        self.max_call_s = max_call_s
        self.max_busy = max_busy
        self.busy_max_s = busy_max_s
        self._condominium_limit = condominium_limit
        self._on_end = [on_end] if on_end else []
        self.sessions: dict[_uuid.UUID, Session] = {}
        self.finished = 0
        self.turned_away = 0

    def add_observer(self, on_end: Callable[[Session], Any]) -> None:
        self._on_end.append(on_end)

    # ------------------------------------------------------------ counts

    def active(self, extension_id: int | None = None, condominium_id: int | None = None) -> int:
        """Admitted visitor calls in progress (turned-away ones do not hold a line)."""
        return sum(
            1
            for s in self.sessions.values()
            if not s.busy
            and (extension_id is None or s.extension.id == extension_id)
            and (condominium_id is None or s.extension.condominium_id == condominium_id)
        )

    def busy(self) -> int:
        """Turned-away calls still hearing "linhas ocupadas"."""
        return sum(1 for s in self.sessions.values() if s.busy)

    def __len__(self) -> int:
        return len(self.sessions)

    # ------------------------------------------------------------ legs arriving

    def on_leg(self, extension_service, leg: AudioSocketProtocol) -> None:
        """The extension manager's hook: a leg has sent its UUID."""
        if leg.role == VISITOR:
            self._visitor(extension_service, leg)
        else:
            self._resident(extension_service.extension, leg)

    def _visitor(self, extension_service, leg: AudioSocketProtocol) -> None:
        extension = extension_service.extension
        if leg.uuid in self.sessions:
            raise Refused("uuid_in_use", "UUID {} is already a call in progress".format(leg.uuid))
        why = None
        if self.active() >= self.max_calls:
            why = "max_calls {} reached".format(self.max_calls)
        elif extension.max_calls is not None and self.active(extension.id) >= extension.max_calls:
            why = "extension max_calls {} reached".format(extension.max_calls)
        else:
            limit = self._condominium_limit(extension.condominium_id)
            if limit is not None and self.active(condominium_id=extension.condominium_id) >= limit:
                why = "condominium max_calls {} reached".format(limit)
        busy = why is not None
        if busy and self.busy() >= self.max_busy:
            raise Refused(
                "busy_overflow",
                "{}, and {} turned-away calls already in progress".format(why, self.max_busy),
            )
        port = extension_service.bound_return_port or extension.return_port
        session = Session(
            leg.uuid,
            extension,
            leg,
            self._reactor,
            busy=busy,
            return_address="{}:{}".format(extension.host, port),
        )
        self.sessions[leg.uuid] = session
        if busy:
            self.turned_away += 1
            self.log.warn(
                "call {uuid} on extension {ext} turned away: {why}",
                uuid=str(leg.uuid),
                ext=extension.id,
                why=why,
            )
            session.call_later(self.busy_max_s, self._busy_expired, session)
            run = self._run_busy
        else:
            self.log.info(
                "call {uuid} started on extension {ext} ({number})",
                uuid=str(leg.uuid),
                ext=extension.id,
                number=extension.ai_extension,
            )
            session.call_later(self.max_call_s, session.end, "max_call")
            run = self._run_flow
        d = defer.maybeDeferred(run, session)
        session.flow = d
        d.addErrback(self._flow_failed, session)
        d.addBoth(self._ended, session)

    def _busy_expired(self, session: Session) -> None:
        # The prompt and the hangup should long be over: a peer that does not read (or
        # does not close) must not keep a turned-away call, and its slot, for ever.
        session.visitor.abort(
            "busy_timeout", "turned-away call still open after {} s".format(self.busy_max_s)
        )

    def _resident(self, extension: Extension, leg: AudioSocketProtocol) -> None:
        session = self.sessions.get(leg.uuid)
        if session is None or not session.expecting_resident:
            raise Refused(
                "unknown_uuid",
                "resident leg with UUID {} was not originated by this server".format(leg.uuid),
            )
        if session.extension.id != extension.id:
            raise Refused(
                "wrong_extension",
                "resident leg {} belongs to extension {}, not {}".format(
                    leg.uuid, session.extension.id, extension.id
                ),
            )
        if session.resident is not None and not session.resident.closed:
            raise Refused("uuid_in_use", "call {} already has a resident leg".format(leg.uuid))
        self.log.info("call {uuid}: resident joined", uuid=str(leg.uuid), ext=extension.id)
        session.resident_joined(leg)

    # ------------------------------------------------------------ end

    def _flow_failed(self, failure, session: Session):
        if session.outcome is None:
            session.outcome = "error"
        self.log.failure(
            "call {uuid}: the flow failed", failure, uuid=str(session.uuid), ext=session.extension.id
        )
        # The legs must not outlive a broken flow.
        for leg in session.legs():
            if not leg.closed:
                leg.stop_playback()
                leg.hangup()
        return None

    def _ended(self, _result, session: Session):
        if self.sessions.get(session.uuid) is session:
            del self.sessions[session.uuid]
        session.finished()
        self.finished += 1
        self.log.info(
            "call {uuid} ended: {outcome} after {total_s} s",
            uuid=str(session.uuid),
            ext=session.extension.id,
            condominium=session.extension.condominium_id,
            outcome=session.outcome,
            total_s=session.timings()["total_s"],
        )
        for observer in self._on_end:
            try:
                d = observer(session)
                if isinstance(d, defer.Deferred):
                    d.addErrback(
                        lambda f: self.log.failure("call record for {uuid}", f, uuid=str(session.uuid))
                    )
            except Exception:
                self.log.failure("observer failed for call {uuid}", uuid=str(session.uuid))
        return None

    # ------------------------------------------------------------ API

    def _find(self, uuid: str) -> Session | None:
        try:
            key = _uuid.UUID(str(uuid))
        except ValueError:
            return None
        return self.sessions.get(key)

    def describe_all(self) -> list[dict]:
        return [s.describe() for s in self.sessions.values()]

    def describe(self, uuid: str) -> dict | None:
        session = self._find(uuid)
        return None if session is None else session.describe()

    def hangup(self, uuid: str) -> defer.Deferred:
        """
        End a call from outside: both legs hear a short goodbye, then the hangup frame.

        @raise KeyError: no such session.
        """
        session = self._find(uuid)
        if session is None:
            raise KeyError(uuid)
        d = session.when_ended()
        session.end("operator")
        return d

    def hangup_all(self) -> defer.Deferred:
        """Shutdown: end every call cleanly and wait for them."""
        waits = []
        for session in list(self.sessions.values()):
            waits.append(session.when_ended())
            session.end("shutdown")
        return defer.gatherResults(waits, consumeErrors=True)
