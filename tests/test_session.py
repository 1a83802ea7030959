"""
Tests for L{audiosocket.session}: how a resident leg is admitted. Only the leg UUID the server
made for a dial attempt admits it — once, within that attempt's ring window, on that
extension's return port, from an allowed peer — and never the visitor's session UUID. Driven
in exact time on the flow bench (L{flowkit}: real legs, registry and flow on StringTransports
and a task.Clock).
"""

from __future__ import annotations

import ipaddress
import uuid

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from audiosocket.leg import RESIDENT, VISITOR, Refused
from audiosocket.model import Extension
from audiosocket.session import LATE_MAX_S, RESIDENT_GRACE_S, Session, SessionRegistry
from flowkit import EXTENSION, Bench, FakeExtensionService, start_call


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.stop()


def dialed(bench, keys="101#"):
    """A visitor types C{keys}; returns the visitor once the dialer has been asked to ring."""
    visitor = start_call(bench, keys)
    bench.until(lambda: bench.dialer.requests)
    return visitor


def decide(bench, resident, key="1"):
    bench.until(lambda: bench.asked(resident, "ask_decision_keypad"))
    resident.press(key)
    bench.until(bench.ended)
    return bench.records[0]


def test_the_session_uuid_does_not_admit_a_resident_leg(bench):
    """
    The forgery: while the phone rings, a resident leg presenting the visitor's session UUID
    is refused (unknown_uuid, counted); the real resident, with the dial's leg UUID, then
    joins and decides.
    """
    visitor = dialed(bench)
    forged = bench.connect(RESIDENT, visitor.leg.uuid)
    assert forged.leg.closed and forged.leg.close_reason == "unknown_uuid"
    assert bench.ret.refused["unknown_uuid"] == 1
    session = bench.registry.sessions[visitor.leg.uuid]
    assert session.resident is None
    resident = bench.resident_for(visitor)
    assert not resident.leg.closed
    record = decide(bench, resident, "2")
    assert record["outcome"] == "denied"
    assert record["resident_leg_uuid"] == str(resident.leg.uuid)


def test_the_dial_request_carries_a_fresh_leg_uuid(bench):
    """The leg UUID is a random (version 4) UUID, not the session's, in the dial request."""
    visitor = dialed(bench)
    (request,) = bench.dialer.requests
    leg_uuid = uuid.UUID(request.leg_uuid)
    assert leg_uuid.version == 4
    assert leg_uuid != visitor.leg.uuid
    assert request.uuid == str(visitor.leg.uuid)
    assert bench.registry.leg_uuids[leg_uuid][0] is bench.registry.sessions[visitor.leg.uuid]
    visitor.drop()
    bench.until(bench.ended)


def test_each_attempt_gets_a_different_leg_uuid(bench):
    """Two attempts, two leg UUIDs; only the current attempt's is routed."""
    dialed(bench)
    bench.until(lambda: len(bench.dialer.requests) == 2, max_s=60)
    first, second = (uuid.UUID(r.leg_uuid) for r in bench.dialer.requests)
    assert first != second
    assert set(bench.registry.leg_uuids) == {second}
    bench.until(bench.ended, max_s=60)
    assert bench.records[0]["outcome"] == "no_answer"


def test_a_leg_uuid_is_single_use(bench):
    """
    The leg that joins consumes its leg UUID: presenting it again (here on a second listener
    of the same return port, so the port's own live-UUID check does not catch it first) is
    refused as unknown_uuid.
    """
    visitor = dialed(bench)
    resident = bench.resident_for(visitor)
    assert bench.registry.leg_uuids == {}
    again = bench.connect(RESIDENT, resident.leg.uuid, factory=bench._factory(RESIDENT))
    assert again.leg.closed and again.leg.close_reason == "unknown_uuid"
    assert decide(bench, resident)["outcome"] == "authorized"


def test_a_leg_uuid_expires_with_its_ring_window():
    """
    A leg UUID is good until the attempt's ring timeout plus the grace, no longer; the
    expired entry is removed and the call leaves no timer behind.
    """
    bench = Bench(attempts=1, ring_timeout_s=30)
    dialed_at = []
    bench.dialer.on_dial = lambda request: dialed_at.append(bench.reactor.seconds())
    visitor = dialed(bench)
    leg_uuid = bench.leg_uuid_for(visitor)
    _, expiry = bench.registry.leg_uuids[leg_uuid]
    assert expiry == pytest.approx(dialed_at[0] + 30 + RESIDENT_GRACE_S)
    bench.advance(expiry - bench.reactor.seconds() - 0.1)
    assert leg_uuid in bench.registry.leg_uuids
    bench.advance(0.2)
    assert bench.registry.leg_uuids == {}
    late = bench.connect(RESIDENT, leg_uuid)
    assert late.leg.closed and late.leg.close_reason == "unknown_uuid"
    bench.until(bench.ended)
    assert bench.records[0]["outcome"] == "no_answer"
    assert bench.leftovers() == []
    bench.stop()


def test_a_leg_uuid_is_refused_on_another_extensions_return_port(bench):
    """
    Presented on another extension's return port a leg UUID is refused (wrong_extension)
    and stays good for its own port.
    """
    other = FakeExtensionService(
        Extension(
            id=8,
            ai_extension="2001",
            ai_port=9080,
            return_extension="2002",
            return_port=9081,
            host="10.0.0.2",
            condominium_id=1,
        ),
        bound_return_port=9081,
    )
    other_port = bench._factory(RESIDENT, other)
    visitor = dialed(bench)
    leg_uuid = bench.leg_uuid_for(visitor)
    stray = bench.connect(RESIDENT, leg_uuid, factory=other_port)
    assert stray.leg.closed and stray.leg.close_reason == "wrong_extension"
    resident = bench.connect(RESIDENT, leg_uuid)
    assert not resident.leg.closed
    assert decide(bench, resident)["outcome"] == "authorized"


def test_a_leg_uuid_from_a_peer_not_allowed_is_refused(bench):
    """
    With allowed_peers set, a connection from another address is refused before its UUID
    frame (peer_not_allowed) and the leg UUID stays good for the PBX.
    """
    ret = bench._factory(RESIDENT, allowed_peers=[ipaddress.ip_network("10.0.0.5/32")])
    visitor = dialed(bench)
    leg_uuid = bench.leg_uuid_for(visitor)
    assert bench.connect(RESIDENT, leg_uuid, factory=ret, host="10.0.0.6") is None
    assert ret.refused["peer_not_allowed"] == 1
    assert leg_uuid in bench.registry.leg_uuids
    resident = bench.connect(RESIDENT, leg_uuid, factory=ret, host="10.0.0.5")
    assert not resident.leg.closed
    assert decide(bench, resident)["outcome"] == "authorized"


def test_describe_shows_the_resident_leg_uuid(bench):
    """The API's view of a call names the leg UUID its resident joined with."""
    visitor = dialed(bench)
    assert bench.registry.describe(str(visitor.leg.uuid))["resident_leg_uuid"] is None
    resident = bench.resident_for(visitor)
    described = bench.registry.describe(str(visitor.leg.uuid))
    assert described["resident_leg_uuid"] == str(resident.leg.uuid)
    assert described["uuid"] == str(visitor.leg.uuid)
    decide(bench, resident)


def test_a_refused_dial_request_revokes_its_leg_uuid(bench):
    """A dial the dialer refuses at once ends the attempt; its leg UUID goes with it."""
    bench.dialer.on_dial = lambda request: (_ for _ in ()).throw(ValueError("bad dial"))
    dialed(bench)
    bench.until(bench.ended, max_s=60)
    assert bench.records[0]["outcome"] == "no_answer"
    assert bench.registry.leg_uuids == {}
    assert bench.leftovers() == []


# -- the session and registry on their own ---------------------------------------------------


class _Leg:
    """Just enough of a leg for the registry's routing."""

    role = RESIDENT
    closed = False

    def __init__(self, leg_uuid):
        self.uuid = leg_uuid


def _registry_and_session(clock):
    registry = SessionRegistry(
        reactor=clock, run_flow=lambda s: defer.Deferred(), run_busy=lambda s: defer.Deferred()
    )
    session = Session(uuid.uuid4(), EXTENSION, object(), clock, routes=registry.leg_uuids)
    registry.sessions[session.uuid] = session
    return registry, session


def test_expect_resident_routes_until_the_window_ends():
    """
    The registry's table maps the leg UUID to (session, expiry) for C{window_s} seconds; the
    session's own DelayedCall removes it then, and a leg presenting it is refused.
    """
    clock = Clock()
    registry, session = _registry_and_session(clock)
    leg_uuid = uuid.uuid4()
    joined = session.expect_resident(leg_uuid, 32.0)
    assert registry.leg_uuids == {leg_uuid: (session, 32.0)}
    assert session.expecting_resident
    clock.advance(31.9)
    assert leg_uuid in registry.leg_uuids
    clock.advance(0.1)
    assert registry.leg_uuids == {} and not session.expecting_resident
    assert clock.getDelayedCalls() == []
    with pytest.raises(Refused) as refused:
        registry.on_leg(FakeExtensionService(EXTENSION), _Leg(leg_uuid))
    assert refused.value.reason == "unknown_uuid"
    assert not joined.called
    joined.cancel()
    joined.addErrback(lambda f: f.trap(defer.CancelledError))


def test_a_joined_leg_consumes_its_uuid_and_the_session_uuid_never_routes():
    """
    The leg UUID admits one leg; a second presentation and the session UUID are refused as
    unknown_uuid.
    """
    clock = Clock()
    registry, session = _registry_and_session(clock)
    leg_uuid = uuid.uuid4()
    joined = session.expect_resident(leg_uuid, 30.0)
    service = FakeExtensionService(EXTENSION)
    with pytest.raises(Refused) as refused:
        registry.on_leg(service, _Leg(session.uuid))
    assert refused.value.reason == "unknown_uuid"
    assert "session UUID" in str(refused.value)
    leg = _Leg(leg_uuid)
    registry.on_leg(service, leg)
    assert joined.result is leg
    assert session.resident is leg and session.resident_leg_uuid == leg_uuid
    leg.closed = True  # even once the first leg is gone
    with pytest.raises(Refused) as refused:
        registry.on_leg(service, _Leg(leg_uuid))
    assert refused.value.reason == "unknown_uuid"
    assert registry.leg_uuids == {} and clock.getDelayedCalls() == []


def test_finished_session_leaves_no_leg_uuid_or_timer():
    """A session ending while it waits for its resident revokes the leg UUID and its timer."""
    clock = Clock()
    registry, session = _registry_and_session(clock)
    joined = session.expect_resident(uuid.uuid4(), 30.0)
    joined.addErrback(lambda f: f.trap(defer.CancelledError))
    session.finished()
    assert registry.leg_uuids == {}
    assert clock.getDelayedCalls() == []
    assert joined.called


class _LateLeg(_Leg):
    """A leg whose connection can be aborted (what the session does to a late leg at the end)."""

    def __init__(self, leg_uuid):
        super().__init__(leg_uuid)
        self.transport = self

    def abortConnection(self):
        self.closed = True


def test_a_parallel_sibling_turns_late_when_another_joins():
    """
    Leg UUIDs expected with on_late stay routed, for the rest of their window, once another
    joins; one without on_late is revoked as before. A leg presenting a late one goes to
    on_late, is never the resident, and consumes it (a second presentation: unknown_uuid).
    """
    clock = Clock()
    registry, session = _registry_and_session(clock)
    late_legs = []
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    session.expect_resident(a, 32.0, late_legs.append)
    session.expect_resident(b, 32.0, late_legs.append)
    joined = session.expect_resident(c, 32.0)
    service = FakeExtensionService(EXTENSION)
    resident = _Leg(a)
    registry.on_leg(service, resident)
    assert joined.result is resident
    assert registry.leg_uuids == {b: (session, 32.0)}
    assert session.is_late(b) and not session.expecting_resident
    with pytest.raises(Refused) as refused:
        registry.on_leg(service, _Leg(c))
    assert refused.value.reason == "unknown_uuid"
    late = _LateLeg(b)
    registry.on_leg(service, late)
    assert late_legs == [late] and session.late_legs == [late]
    assert session.resident is resident and session.resident_leg_uuid == a
    assert registry.leg_uuids == {}
    late.closed = True
    with pytest.raises(Refused) as refused:
        registry.on_leg(service, _Leg(b))
    assert refused.value.reason == "unknown_uuid"
    session.finished()
    assert clock.getDelayedCalls() == []


def test_a_late_leg_uuid_expires_with_its_ring_window():
    """A late leg UUID is admitted within its dial's ring window only, then unknown_uuid."""
    clock = Clock()
    registry, session = _registry_and_session(clock)
    late_legs = []
    a, b = uuid.uuid4(), uuid.uuid4()
    session.expect_resident(a, 32.0, late_legs.append)
    session.expect_resident(b, 32.0, late_legs.append)
    service = FakeExtensionService(EXTENSION)
    clock.advance(10.0)
    registry.on_leg(service, _Leg(a))
    clock.advance(22.0)
    assert registry.leg_uuids == {}
    with pytest.raises(Refused) as refused:
        registry.on_leg(service, _Leg(b))
    assert refused.value.reason == "unknown_uuid"
    assert late_legs == []
    session.finished()
    assert clock.getDelayedCalls() == []


def test_a_late_leg_is_closed_after_late_max_s_and_with_the_session():
    """
    A late leg still open LATE_MAX_S after it joined is aborted; stop_late revokes the late
    leg UUIDs left; a session ending closes its late legs and leaves no timer.
    """
    clock = Clock()
    registry, session = _registry_and_session(clock)
    ids = [uuid.uuid4() for _ in range(4)]
    for leg_uuid in ids:
        session.expect_resident(leg_uuid, 32.0, lambda leg: None)
    service = FakeExtensionService(EXTENSION)
    registry.on_leg(service, _Leg(ids[0]))
    slow = _LateLeg(ids[1])
    registry.on_leg(service, slow)
    clock.advance(LATE_MAX_S - 0.01)
    assert not slow.closed
    clock.advance(0.01)
    assert slow.closed
    last = _LateLeg(ids[2])
    registry.on_leg(service, last)
    session.stop_late()
    assert registry.leg_uuids == {}
    session.finished()
    assert last.closed
    assert clock.getDelayedCalls() == []


def test_the_dial_names_an_ipv6_host_in_brackets(bench):
    """
    An extension reached over IPv6 is dialed as C{[address]:port}, the form Asterisk's
    AudioSocket() parses; a bare C{2001:db8::5:8081} would be read as an address alone.
    """
    bench.service = FakeExtensionService(
        attrs.evolve(EXTENSION, host="2001:db8::5"), bound_return_port=8201
    )
    bench.ai = bench._factory(VISITOR)
    dialed(bench)
    assert bench.dialer.requests[0].audiosocket == "[2001:db8::5]:8201"


def test_hangup_all_waits_for_the_records_of_the_calls_it_ends():
    """
    Shutdown's wait fires only once the calls have ended I{and} their C{on_end} observer's
    Deferred (the call record's write) has fired: the store may be stopped only then.
    """
    clock = Clock()
    writes = []

    def record(session):
        d = defer.Deferred()
        writes.append(d)
        return d

    flow = defer.Deferred()
    registry = SessionRegistry(
        reactor=clock, run_flow=lambda s: flow, run_busy=lambda s: flow, on_end=record
    )
    registry.on_leg(FakeExtensionService(EXTENSION), _Visitor(uuid.uuid4()))
    (session,) = registry.sessions.values()
    done = registry.hangup_all()
    assert session.ended_by == "shutdown"
    assert flow.called and len(registry) == 0  # the flow was cancelled: the call ended
    assert len(writes) == 1 and not done.called  # ... but its record is still being written
    writes[0].callback(None)
    assert done.called
    assert clock.getDelayedCalls() == []


class _Visitor:
    """Just enough of a visitor's leg for the registry to start a session."""

    role = "visitor"
    closed = False

    def __init__(self, leg_uuid):
        self.uuid = leg_uuid



# ---------------------------------------------------------------- the session's verbs


def _session(reactor=None) -> Session:
    return Session(uuid.uuid4(), EXTENSION, None, reactor or Clock())


def test_states_only_move_forward():
    """enter() moves the state on; a state earlier than the current one is ignored."""
    session = _session()
    session.enter("dialing")
    session.enter("collecting")
    assert session.state == "dialing"
    session.enter("finishing")
    assert session.state == "finishing"


def test_first_outcome_and_first_ended_by_stay():
    """conclude(): the first writer wins, for the outcome and for ended_by each."""
    session = _session()
    session.conclude("no_decision", by="resident")
    session.conclude("authorized", by="server")
    assert (session.outcome, session.ended_by) == ("no_decision", "resident")


def test_ended_by_told_before_the_outcome_stays():
    """An end from outside (max_call) names who ended it; the flow's outcome comes after."""
    session = _session()
    session.end("max_call")
    session.conclude("abandoned", by="operator")
    assert (session.outcome, session.ended_by) == ("abandoned", "max_call")


def test_a_decision_keeps_its_evidence_and_time():
    """A resident's decision sets decision_input and decided_at."""
    reactor = Clock()
    session = _session(reactor)
    reactor.advance(12)
    session.conclude("authorized", evidence="dtmf:1")
    assert (session.decision_input, session.decided_at) == ("dtmf:1", 12)
    session.conclude("denied", evidence="dtmf:2")
    assert (session.outcome, session.decision_input) == ("authorized", "dtmf:1")


def test_no_decision_keeps_its_evidence_without_a_decision_time():
    """Unclear answers: the evidence is kept, but no decision was made (no decided_at)."""
    session = _session()
    session.conclude("no_decision", evidence="dtmf:5")
    assert (session.decision_input, session.decided_at) == ("dtmf:5", None)


def test_unknown_outcome_is_refused():
    """An outcome outside OUTCOMES is a bug, not a record."""
    with pytest.raises(ValueError):
        _session().conclude("maybe")


def test_a_session_without_outcome_finishes_as_error():
    """A flow that never concluded the session leaves it as error."""
    session = _session()
    session.finished()
    assert (session.state, session.outcome) == ("ended", "error")
