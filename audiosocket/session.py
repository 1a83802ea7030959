# -*- test-case-name: tests.test_session,tests.test_flow,tests.test_flow_voice,tests.test_leg_tcp,tests.test_extension -*-
"""
Sessions: one visitor call, the resident leg that joins it, its facts and its end.

A visitor leg on an extension's AI port opens a L{Session} keyed by its UUID. That UUID is
the visitor's side's choice (whatever its C{AudioSocket()} sent), so it identifies the call
and is never a credential.

The resident leg and its credential
===================================

Each dial attempt gets a fresh C{leg_uuid} made here (C{uuid4}: the operating system's
CSPRNG), passed to the dialer and by the PBX to the resident call's C{AudioSocket()}. The
flow calls L{Session.expect_resident} with it; from then on the L{SessionRegistry} admits a
resident leg presenting that UUID, and only

  - on the return port of the session's own extension (elsewhere: C{wrong_extension}, and
    the UUID stays valid for its own port);
  - once: the leg that joins consumes it, a second presentation is C{unknown_uuid};
  - within the attempt's ring window: from the dial request until the attempt's ring timeout
    plus L{RESIDENT_GRACE_S} for the connect and handshake. At its end a DelayedCall owned by
    the session removes the UUID (C{unknown_uuid} after that);
  - from a peer in C{[server] allowed_peers} (checked when the connection is accepted, before
    any frame: C{peer_not_allowed}).

A resident leg presenting the visitor's session UUID is refused (C{unknown_uuid}, logged as
such): it is not the credential.

A late answer to an earlier attempt is refused. The flow revokes an attempt's leg UUID as
soon as that attempt is over (its ring window passed, or the dialer reported it failed), so
only the leg UUIDs of one attempt (one per phone rung) are valid at any time, and the
windows of two attempts never overlap. (The PBX rings for the ring timeout only; the grace covers a call answered
at its last moment.)

A late answer in the same parallel attempt
==========================================

With the C{parallel} strategy every phone of the unit rings at once, each dial with its own
leg UUID, expected with an C{on_late} handler (L{Session.expect_resident}). When one of them
joins as the resident, the others are not dropped: they become I{late} leg UUIDs, admitted on
the same terms (the same return port, the same peers, the rest of the same ring window, once)
but only into the late path. A leg presenting one is handed to C{on_late} (the flow says
"outro morador já atendeu" and hangs it up): it is never the session's resident, never hears
the announcement and never decides. A second presentation, any other UUID, or any leg once
the flow is finishing (L{Session.stop_late}) or the session has ended is C{unknown_uuid}, as
before. A late leg is no refusal (not counted as one); the record lists its dial as C{late}.
The late legs still open when the session ends are closed with it (L{LATE_MAX_S} bounds each
one's time in any case).

The L{SessionRegistry} is the only place keyed by call: it admits or turns away visitors
(C{max_calls}, per-extension limits), routes resident legs by leg UUID, and when a session's
flow ends it removes every trace of it (sessions, leg UUIDs, timers) and hands the call
record on.

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

from audiosocket import wire
from audiosocket.events import level_dbfs
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
    "transferred",
    "transfer_failed",
    "preauthorized",
    "error",
)

#: The longest a late answer (a parallel dial answered after another resident joined) stays
#: connected: time to hear "outro morador já atendeu" and the hangup frame, then it is closed.
LATE_MAX_S = 8.0

#: How long after an attempt's ring timeout its leg UUID is still accepted: a call answered
#: at the last moment still has to connect to the return port and send its UUID frame.
RESIDENT_GRACE_S = 2.0

# Flow states, in the order a call goes through them (shown by the API).
GREETING = "greeting"
COLLECTING = "collecting"
DIALING = "dialing"
ANNOUNCING = "announcing"
DECIDING = "deciding"
FINISHING = "finishing"
ENDED = "ended"
STATES = (GREETING, COLLECTING, DIALING, ANNOUNCING, DECIDING, FINISHING, ENDED)

#: The outcomes that are a resident's decision (they set C{decided_at}).
DECISIONS = ("authorized", "denied")


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
        "level_in_dbfs": level_dbfs(leg.last_in),
        "level_out_dbfs": level_dbfs(leg.last_out, wire.HEADER_SIZE),
    }


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@define(eq=False, repr=False)
class Session:
    """
    One visitor call and, once it joins, the resident's leg.

    Times ending in C{_at} are reactor seconds (C{reactor.seconds()}); C{started_wall} is the
    wall-clock start, for the record.

    The session owns the rules of its own state; the flow (and the registry) change it only
    through these verbs, never by assigning its fields:

      - L{enter}: the flow's state moves forward only (L{STATES} is the order);
      - L{learn}: what the flow knows of the visitor now;
      - L{attempt}, L{dial_failed}: the dial attempts;
      - L{conclude}: how the call ended — the first outcome and the first C{ended_by} told
        stay (a later writer does not overwrite them), with the evidence of a decision;
      - L{end}: end it from outside (max call time, operator, shutdown).
    """

    uuid: _uuid.UUID
    extension: Extension
    visitor: AudioSocketProtocol
    reactor: Any
    busy: bool = False
    #: "host:port" where Asterisk must connect the resident's call (the dial request's
    #: C{audiosocket}): the extension's host and the return port actually bound.
    return_address: str = ""
    #: The node (C{[server] node}) serving this call, for the record and the API.
    node: str = ""
    resident: AudioSocketProtocol | None = None
    facts: Facts = field(factory=Facts)
    state: str = GREETING
    outcome: str | None = None
    ended_by: str | None = None
    decision_input: str | None = None
    #: The latest line understood, for the operator's screen: set only when
    #: C{[privacy] log_speech} allows it (never part of the call record).
    last_heard: str | None = None
    attempts: int = 0
    dial_failures: list = field(factory=list)
    #: How people were reached (the flow's L{audiosocket.flow.call} writes it): C{strategy},
    #: C{dials} (every leg tried: attempt, resident, result), C{decided_by}, C{handoff}.
    reach: dict = field(factory=dict)
    #: What the gate did (C{kind}, C{result}, C{error}, C{attempts}), once the visitor could enter.
    gate: dict = field(factory=dict)
    started_at: float = 0.0
    started_wall: float = 0.0
    resident_at: float | None = None
    decided_at: float | None = None
    ended_at: float | None = None
    ended_wall: float | None = None
    flow: defer.Deferred | None = None
    #: The leg UUID the resident's leg that joined presented (the dial's, never ours).
    resident_leg_uuid: _uuid.UUID | None = None
    #: leg UUID → (session, expiry in reactor seconds): the registry's routing table, shared
    #: by every session of a registry (a session on its own gets a table of its own).
    routes: dict = field(factory=dict)
    #: The legs admitted into the late path (parallel dials answered after the resident).
    late_legs: list = field(factory=list)
    _resident_waiter: defer.Deferred | None = None
    #: This session's leg UUIDs still admitted → the DelayedCall expiring each.
    _expected: dict = field(factory=dict)
    #: Expected leg UUIDs that turn late when another joins → their C{on_late} handler.
    _on_late: dict = field(factory=dict)
    #: Late leg UUIDs (admitted for the late path only) → (C{on_late}, their DelayedCall).
    _late: dict = field(factory=dict)
    _timers: list = field(factory=list)
    _end_waiters: list = field(factory=list)

    log = Logger()

    def __attrs_post_init__(self):
        self.started_at = self.reactor.seconds()
        self.started_wall = time.time()

    # ------------------------------------------------------------ the resident leg

    @property
    def expecting_resident(self) -> bool:
        """Is a leg UUID of this session admitted right now?"""
        return bool(self._expected)

    def expect_resident(
        self, leg_uuid: _uuid.UUID, window_s: float, on_late: Callable | None = None
    ) -> defer.Deferred:
        """
        From now on, for C{window_s} seconds, a resident leg presenting C{leg_uuid} on this
        session's return port is admitted, once.

        With C{on_late} (a parallel dial), if another leg UUID of this session joins first,
        C{leg_uuid} stays admitted for the rest of its window, once, but only into the late
        path: a leg presenting it is given to C{on_late(leg)}, never joined.

        @return: a Deferred firing with the leg when it joins; cancelling it stops waiting
            (the leg UUID stays admitted until L{stop_expecting} or the window's end).
        @raise ValueError: C{leg_uuid} is already routed (to this or another session).
        """
        if leg_uuid in self.routes:
            raise ValueError("leg UUID {} is already expected".format(leg_uuid))
        expiry = self.reactor.seconds() + window_s
        self.routes[leg_uuid] = (self, expiry)
        self._expected[leg_uuid] = self.call_later(window_s, self._expire, leg_uuid)
        if on_late is not None:
            self._on_late[leg_uuid] = on_late
        waiter = defer.Deferred(self._cancel_waiter)
        self._resident_waiter = waiter
        return waiter

    def _cancel_waiter(self, waiter: defer.Deferred) -> None:
        if self._resident_waiter is waiter:
            self._resident_waiter = None

    def _expire(self, leg_uuid: _uuid.UUID) -> None:
        if self._revoke(leg_uuid):
            self.log.info(
                "call {uuid}: leg UUID {leg_uuid} expired unused",
                uuid=str(self.uuid),
                leg_uuid=str(leg_uuid),
                ext=self.extension.id,
            )

    def _revoke(self, leg_uuid: _uuid.UUID) -> bool:
        self._on_late.pop(leg_uuid, None)
        timer = self._expected.pop(leg_uuid, None)
        if timer is None and leg_uuid in self._late:
            timer = self._late.pop(leg_uuid)[1]
        if timer is not None and timer.active():
            timer.cancel()
        entry = self.routes.get(leg_uuid)
        if entry is not None and entry[0] is self:
            del self.routes[leg_uuid]
        return timer is not None

    def stop_expecting(self, leg_uuid: _uuid.UUID | None = None) -> None:
        """
        Revoke C{leg_uuid} (the attempt is over), or with no argument every leg UUID of this
        session still expected and the wait for the resident (the flow has stopped waiting).
        Late leg UUIDs stay (L{stop_late} revokes them).
        """
        if leg_uuid is not None:
            if leg_uuid in self._expected:
                self._revoke(leg_uuid)
            return
        for pending in list(self._expected):
            self._revoke(pending)
        waiter, self._resident_waiter = self._resident_waiter, None
        if waiter is not None and not waiter.called:
            waiter.cancel()

    def revoke(self, leg_uuid: _uuid.UUID) -> None:
        """C{leg_uuid} admits nothing any more, expected or late (its window has passed)."""
        self._revoke(leg_uuid)

    def stop_late(self) -> None:
        """Revoke every late leg UUID: no late answer is admitted from now on."""
        for pending in list(self._late):
            self._revoke(pending)

    def is_late(self, leg_uuid: _uuid.UUID) -> bool:
        """Does C{leg_uuid} admit a leg into the late path (and only there)?"""
        return leg_uuid in self._late

    def resident_joined(self, leg: AudioSocketProtocol) -> None:
        """
        The resident's leg presented one of this session's leg UUIDs (the registry checked
        it): it is consumed, every other one of this session with an C{on_late} handler
        turns late (same window), and every other one revoked.
        """
        self.resident = leg
        self.resident_leg_uuid = leg.uuid
        self.resident_at = self.reactor.seconds()
        for pending in list(self._expected):
            on_late = self._on_late.pop(pending, None)
            if on_late is not None and pending != leg.uuid:
                self._late[pending] = (on_late, self._expected.pop(pending))
            else:
                self._revoke(pending)
        waiter, self._resident_waiter = self._resident_waiter, None
        if waiter is not None:
            waiter.callback(leg)

    def late_joined(self, leg: AudioSocketProtocol) -> None:
        """
        A leg presented a late leg UUID of this session (the registry checked it): it is
        consumed, and the leg handed to its C{on_late} handler. It is closed after
        L{LATE_MAX_S} whatever it is doing, and with the session at the latest.
        """
        on_late, timer = self._late.pop(leg.uuid)
        if timer.active():
            timer.cancel()
        entry = self.routes.get(leg.uuid)
        if entry is not None and entry[0] is self:
            del self.routes[leg.uuid]
        self.late_legs.append(leg)
        self.call_later(LATE_MAX_S, self._close_late, leg)
        try:
            on_late(leg)
        except Exception:
            self.log.failure("call {uuid}: the late path failed", uuid=str(self.uuid))
            self._close_late(leg)

    def _close_late(self, leg: AudioSocketProtocol) -> None:
        if not leg.closed:
            leg.transport.abortConnection()

    # ------------------------------------------------------------ the flow's verbs

    def enter(self, state: str) -> None:
        """Move the call to C{state}; a state earlier than the current one is ignored."""
        if STATES.index(state) > STATES.index(self.state):
            self.state = state

    def learn(self, facts: Facts) -> None:
        """What the flow now knows of the visitor (it replaces what was known)."""
        self.facts = facts

    def attempt(self, n: int) -> None:
        """The flow is making its C{n}th dial attempt."""
        self.attempts = max(self.attempts, n)

    def heard(self, text: str) -> None:
        """The latest line understood, for the operator's screen (only when speech may be shown)."""
        self.last_heard = text[:200]

    def note_reach(self, **values) -> None:
        """Facts of how people were reached (strategy, hand-off, who decided), for the record."""
        self.reach.update(values)

    def tried(self, attempt: int, resident: str | None, dial: str, result: str) -> None:
        """One leg tried in attempt C{attempt}, with its C{result} (the record's C{reach.dials})."""
        self.reach.setdefault("dials", []).append(
            {"attempt": attempt, "resident": resident, "dial": dial, "result": result}
        )

    def tried_late(self, attempt: int, resident: str | None, dial: str) -> None:
        """
        The phone of C{dial} in attempt C{attempt} answered after another resident had
        joined: its C{reach.dials} entry's result becomes C{late}.
        """
        for entry in self.reach.setdefault("dials", []):
            if entry["attempt"] == attempt and entry["dial"] == dial and entry["result"] == "cancelled":
                entry["result"] = "late"
                return
        self.tried(attempt, resident, dial, "late")

    def note_gate(self, **values) -> None:
        """What the gate did once the visitor could enter (kind, result, error), for the record."""
        self.gate = dict(values)

    def dial_failed(self, attempt: int, reason: str) -> None:
        """Attempt C{attempt} did not reach the resident, for C{reason} (kept in the record)."""
        self.dial_failures.append({"attempt": attempt, "reason": reason})

    def conclude(self, outcome: str, by: str | None = None, evidence: str | None = None) -> None:
        """
        The call's C{outcome}, and who ended it (C{by}: visitor, resident, server, max_call,
        operator, shutdown). The first writer wins for each: once set, the outcome and
        C{ended_by} stay. C{evidence} (what the resident typed or said, as the record keeps
        it) goes with the outcome that it decided, and a decision (L{DECISIONS}) sets
        C{decided_at}.
        """
        if outcome not in OUTCOMES:
            raise ValueError("unknown outcome {!r}".format(outcome))
        if by is not None and self.ended_by is None:
            self.ended_by = by
        if self.outcome is not None:
            return
        self.outcome = outcome
        if evidence is not None:
            self.decision_input = evidence
            if outcome in DECISIONS:
                self.decided_at = self.reactor.seconds()

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
        self.enter(ENDED)
        self.ended_at = self.reactor.seconds()
        self.ended_wall = time.time()
        self.conclude("error")  # unless the flow said otherwise
        self.stop_expecting()
        self.stop_late()
        for leg in self.late_legs:
            self._close_late(leg)
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
            "node": self.node,
            "extension_id": self.extension.id,
            "condominium_id": self.extension.condominium_id,
            "state": self.state,
            "busy": self.busy,
            "outcome": self.outcome,
            "started_at": _iso(self.started_wall),
            "facts": self.facts_dict(),
            "attempts": self.attempts,
            "resident_leg_uuid": _str(self.resident_leg_uuid),
            "legs": {VISITOR: _leg_info(self.visitor), RESIDENT: _leg_info(self.resident)},
            "timings": self.timings(),
            "last_heard": self.last_heard,
        }

    def record(self) -> dict:
        """The call record kept once the session has ended."""
        return {
            "uuid": str(self.uuid),
            "node": self.node,
            "extension_id": self.extension.id,
            "condominium_id": self.extension.condominium_id,
            "started_at": _iso(self.started_wall),
            "ended_at": _iso(self.ended_wall or time.time()),
            "outcome": self.outcome,
            "ended_by": self.ended_by,
            "facts": self.facts_dict(),
            "decision_input": self.decision_input,
            "attempts": self.attempts,
            "resident_leg_uuid": _str(self.resident_leg_uuid),
            "dial_failures": list(self.dial_failures),
            "reach": dict(self.reach),
            "gate": dict(self.gate) if self.gate else None,
            "timings": self.timings(),
        }


def _host_port(host: str, port: int) -> str:
    """C{host:port} as Asterisk's C{AudioSocket()} parses it: an IPv6 host in brackets."""
    return "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + ".{:03d}Z".format(
        int((wall % 1) * 1000)
    )


class SessionRegistry:
    """
    Every session of this process, by UUID.

    @param run_flow: C{run_flow(session) -> Deferred} runs the conversation; it fires when
        the call is over (both legs hung up). It concludes the session
        (L{Session.conclude}); a flow that does not is concluded as C{error}.
    @param run_busy: the same for a visitor turned away for lack of lines.
    @param max_busy: turned-away calls at once; one more is closed without a word.
    @param busy_max_s: a turned-away call is closed after this long.
    @param on_end: called with each finished session (call records, metrics); errors are
        logged, never raised into the call.
    @param return_host: C{return_host(extension_host) -> host}: where the PBX must connect
        a resident's call for it to come back to this node (see
        L{audiosocket.config.ServerConfig.return_host}); by default the extension's C{host}.
    @param node: this node's name, written into each session's record.
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
        return_host: Callable[[str], str] | None = None,
        node: str = "",
    ):
        self._return_host = return_host or (lambda host: host)
        self.node = node
        self._reactor = reactor
        self._run_flow = run_flow
        self._run_busy = run_busy
        self.max_calls = max_calls
        self.max_call_s = max_call_s
        self.max_busy = max_busy
        self.busy_max_s = busy_max_s
        self._condominium_limit = condominium_limit
        self._on_end = [on_end] if on_end else []
        self._on_start: list[Callable[[Session], Any]] = []
        self.sessions: dict[_uuid.UUID, Session] = {}
        #: leg UUID → (session, expiry in reactor seconds): the dials whose resident leg may
        #: still join. Written by the sessions (L{Session.expect_resident}).
        self.leg_uuids: dict[_uuid.UUID, tuple[Session, float]] = {}
        self.finished = 0
        self.turned_away = 0
        #: Ended sessions whose observers' Deferreds (record writes) have not fired yet.
        self._settling: set[defer.Deferred] = set()
        #: session → Deferreds firing once it has ended and its observers are done.
        self._settle_waiters: dict[Session, list[defer.Deferred]] = {}

    def add_observer(self, on_end: Callable[[Session], Any]) -> None:
        self._on_end.append(on_end)

    def add_start_observer(self, on_start: Callable[[Session], Any]) -> None:
        """Call C{on_start(session)} when a visitor's call starts (admitted or turned away)."""
        self._on_start.append(on_start)

    def when_started(self, uuid: _uuid.UUID | None = None) -> defer.Deferred:
        """
        A Deferred firing with the next session to start (the one of C{uuid}, if given; at
        once if it is already in progress): what tests and tools wait on instead of time.
        """
        if uuid is not None and uuid in self.sessions:
            return defer.succeed(self.sessions[uuid])
        d = defer.Deferred(lambda d: self._on_start.remove(fire))

        def fire(session):
            if uuid is None or session.uuid == uuid:
                self._on_start.remove(fire)
                d.callback(session)

        self._on_start.append(fire)
        return d

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
            return_address=_host_port(self._return_host(extension.host), port),
            node=self.node,
            routes=self.leg_uuids,
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
        for on_start in list(self._on_start):
            on_start(session)

    def _busy_expired(self, session: Session) -> None:
        # The prompt and the hangup should long be over: a peer that does not read (or
        # does not close) must not keep a turned-away call, and its slot, for ever.
        session.visitor.abort(
            "busy_timeout", "turned-away call still open after {} s".format(self.busy_max_s)
        )

    def _resident(self, extension: Extension, leg: AudioSocketProtocol) -> None:
        """
        Route a resident leg by the leg UUID it presented: see the module docstring for
        what is admitted. Raising L{Refused} closes the leg (logged, counted).
        """
        entry = self.leg_uuids.get(leg.uuid)
        if entry is not None and entry[1] <= self._reactor.seconds():
            # Past its window (its DelayedCall has not run yet): as good as removed.
            entry[0].revoke(leg.uuid)
            entry = None
        if entry is None:
            if leg.uuid in self.sessions:
                raise Refused(
                    "unknown_uuid",
                    "resident leg presented the visitor's session UUID {}, which is not a "
                    "credential; only the leg UUID of a dial admits a resident leg".format(
                        leg.uuid
                    ),
                )
            raise Refused(
                "unknown_uuid",
                "resident leg with UUID {} matches no dial in progress (never made, already "
                "used or expired)".format(leg.uuid),
            )
        session = entry[0]
        if session.extension.id != extension.id:
            raise Refused(
                "wrong_extension",
                "resident leg {} belongs to extension {}, not {}".format(
                    leg.uuid, session.extension.id, extension.id
                ),
            )
        if session.is_late(leg.uuid):
            # Another resident has joined this parallel attempt: this phone hears that and
            # is hung up, and is never joined (consumed: a second presentation finds nothing).
            self.log.info(
                "call {uuid}: late answer with leg UUID {leg_uuid}; another resident joined",
                uuid=str(session.uuid),
                leg_uuid=str(leg.uuid),
                ext=extension.id,
            )
            session.late_joined(leg)
            return
        if session.resident is not None and not session.resident.closed:
            raise Refused("uuid_in_use", "call {} already has a resident leg".format(session.uuid))
        self.log.info(
            "call {uuid}: resident joined with leg UUID {leg_uuid}",
            uuid=str(session.uuid),
            leg_uuid=str(leg.uuid),
            ext=extension.id,
        )
        # Consumed: a second presentation finds nothing.
        session.resident_joined(leg)

    # ------------------------------------------------------------ end

    def _flow_failed(self, failure, session: Session):
        session.conclude("error")
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
        pending = []
        for observer in self._on_end:
            try:
                d = observer(session)
                if isinstance(d, defer.Deferred):
                    d.addErrback(
                        lambda f: self.log.failure("call record for {uuid}", f, uuid=str(session.uuid))
                    )
                    pending.append(d)
            except Exception:
                self.log.failure("observer failed for call {uuid}", uuid=str(session.uuid))
        # Settled once every observer's work (the call record's write) is done.
        waiters = self._settle_waiters.pop(session, [])
        settled = defer.gatherResults(pending, consumeErrors=True)
        self._settling.add(settled)

        def done(_):
            self._settling.discard(settled)
            for w in waiters:
                if not w.called:
                    w.callback(None)

        settled.addBoth(done)
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
        """
        Shutdown: end every call cleanly and wait for them I{and} for what their end
        started (every C{on_end} observer's Deferred: the call record's write), so the
        store may be stopped once this fires. Cancelling it only stops the wait.
        """
        waits = []
        for session in list(self.sessions.values()):
            w = defer.Deferred()
            self._settle_waiters.setdefault(session, []).append(w)
            waits.append(w)
            session.end("shutdown")
        for settling in list(self._settling):
            w = defer.Deferred()
            settling.addBoth(lambda result, w=w: (None if w.called else w.callback(None), result)[1])
            waits.append(w)
        return defer.gatherResults(waits, consumeErrors=True)
