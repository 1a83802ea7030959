"""
Tests for L{audiosocket.extension}: extensions added, changed, restarted and removed at run
time, on a MemoryReactor (no sockets), with legs on StringTransports.
"""

import uuid

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from audiosocket import wire
from audiosocket.extension import DRAINING, FAILED, LISTENING, Conflict, NotFound
from audiosocket.model import InvalidField
from extkit import ManagerSetup, ext, run


class Setup(ManagerSetup):
    def call(self, svc, port="ai", uid=None):
        factory = svc.ai_factory if port == "ai" else svc.return_factory
        leg = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        t = StringTransport()
        leg.makeConnection(t)
        leg.dataReceived(wire.uuid_frame(uid or uuid.uuid4()))
        return leg, t


def test_add_listens_on_both_ports():
    """Adding an extension listens on its AI and return ports and maps both to it."""
    s = Setup()
    svc = run(s.manager.add(ext()))
    assert s.reactor.listening() == [8080, 8081]
    assert svc.status == LISTENING
    assert s.manager.port_map == {8080: 1, 8081: 1}
    assert s.manager.number_map == {"1001": 1, "2001": 1}
    assert svc.describe()["bound_ai_port"] == 8080


def test_duplicate_id_conflict():
    """A second extension with the same id is a Conflict and nothing is opened."""
    s = Setup()
    run(s.manager.add(ext()))
    with pytest.raises(Conflict):
        run(s.manager.add(ext(ai=9000, ret=9001)))
    assert s.reactor.listening() == [8080, 8081]


def test_port_taken_by_other_extension_conflict():
    """A port another extension uses is a Conflict, checked before listening."""
    s = Setup()
    run(s.manager.add(ext()))
    with pytest.raises(Conflict):
        run(s.manager.add(ext(id=2, ai=9000, ret=8081)))
    assert 2 not in s.manager.extensions


def test_unknown_condominium_is_invalid():
    """An extension of an unknown condominium is refused as an invalid field."""
    s = Setup()
    with pytest.raises(InvalidField) as e:
        run(s.manager.add(ext(condo=7)))
    assert e.value.field == "condominium_id"


def test_busy_port_is_an_error_and_nothing_listens():
    """A busy return port fails the add; the AI port opened first is closed again."""
    s = Setup()
    s.reactor.busy.add(8081)
    with pytest.raises(Conflict) as e:
        run(s.manager.add(ext()))
    assert "8081" in str(e.value)
    assert 1 not in s.manager.extensions


def test_port_fallback():
    """With port fallback, a busy port is replaced by a free one of the range, reported."""
    s = Setup(fallback=(20000, 20010))
    s.reactor.busy |= {8080, 20000}
    svc = run(s.manager.add(ext()))
    assert (svc.bound_ai_port, svc.bound_return_port) == (20001, 8081)
    assert s.manager.port_map == {20001: 1, 8081: 1}


def test_load_keeps_failed_extension():
    """At start-up an extension that cannot listen is kept as failed, not forgotten."""
    s = Setup()
    s.reactor.busy.add(8080)
    run(s.manager.load([ext(), ext(id=2, ai=9000, ret=9001)]))
    assert s.manager.get(1).status == FAILED
    assert "8080" in s.manager.get(1).describe()["error"]
    assert s.manager.get(2).status == LISTENING
    s.reactor.busy.clear()
    run(s.manager.restart(1))
    assert s.manager.get(1).status == LISTENING


def test_update_rebinds_ports_and_keeps_calls():
    """Changing ports rebinds; a call in progress on the old port is untouched."""
    s = Setup()
    svc = run(s.manager.add(ext()))
    leg, t = s.call(svc)
    run(s.manager.update(ext(ai=9090, ret=9091)))
    assert s.manager.port_map == {9090: 1, 9091: 1}
    s.reactor.advance(0.02)
    assert not t.disconnecting and leg.stats.frames == 1


def test_update_to_busy_port_keeps_old_ports():
    """A rebind to a busy port fails and leaves the extension on its old ports."""
    s = Setup()
    run(s.manager.add(ext()))
    s.reactor.busy.add(9091)
    with pytest.raises(Conflict):
        run(s.manager.update(ext(ai=9090, ret=9091)))
    svc = s.manager.get(1)
    assert svc.extension.ai_port == 8080 and svc.status == LISTENING
    assert s.manager.port_map == {8080: 1, 8081: 1}


def test_update_unknown_is_not_found():
    """Updating or removing an unknown id raises NotFound."""
    s = Setup()
    with pytest.raises(NotFound):
        run(s.manager.update(ext()))
    with pytest.raises(NotFound):
        run(s.manager.remove(5))


def test_remove_drains_calls():
    """Removal stops listening at once; a call in progress plays on until it ends."""
    s = Setup()
    svc = run(s.manager.add(ext()))
    leg, t = s.call(svc)
    removed = run(s.manager.remove(1))
    assert s.manager.port_map == {}
    assert removed.status == DRAINING and 1 in s.manager.draining
    s.reactor.advance(0.02)
    assert not t.disconnecting and leg.stats.frames == 1
    t.loseConnection()
    leg.connectionLost()
    assert removed.stopped.called and 1 not in s.manager.draining


def test_remove_force_hangs_up_cleanly():
    """Removal with force sends each leg the hangup frame on the next tick."""
    s = Setup()
    svc = run(s.manager.add(ext()))
    leg, t = s.call(svc)
    leg.play(b"\x01\x00" * 1600)
    run(s.manager.remove(1, force=True))
    s.reactor.advance(0.02)
    frames = wire.Decoder(expect_uuid=False).feed(t.value())
    assert frames[-1].kind == wire.Kind.HANGUP and t.disconnecting


def test_other_extension_untouched():
    """Adding, changing and removing B never interrupts a call on A."""
    s = Setup()
    a = run(s.manager.add(ext()))
    leg, t = s.call(a)
    run(s.manager.add(ext(id=2, ai=9000, ret=9001)))
    s.reactor.advance(0.02)
    run(s.manager.update(ext(id=2, ai=9100, ret=9101)))
    s.reactor.advance(0.02)
    run(s.manager.remove(2, force=True))
    s.reactor.advance(0.02)
    assert leg.stats.frames == 3 and not t.disconnecting
    assert leg.stats.max_gap_ms == pytest.approx(20.0)


def test_shutdown_hangs_up_every_leg():
    """Stopping the manager hangs up the calls of every extension."""
    s = Setup()
    svc = run(s.manager.add(ext()))
    leg, t = s.call(svc)
    stopping = s.manager.stopService()
    s.reactor.advance(0.02)
    assert t.disconnecting
    leg.connectionLost()
    assert stopping.called


# ---------------------------------------------------------------- bounds


class BusySetup(Setup):
    """
    A manager whose legs go to a real L{SessionRegistry}: one line (max_calls 1), admitted
    calls that never end by themselves, and turned-away calls that last until their leg
    closes (as the busy prompt does when the peer never hangs up).
    """

    def __init__(self, **registry):
        from twisted.internet import defer

        from audiosocket.session import SessionRegistry

        super().__init__(on_leg=lambda svc, leg: self.registry.on_leg(svc, leg))
        self.registry = SessionRegistry(
            reactor=self.reactor,
            run_flow=lambda session: defer.Deferred(),
            run_busy=lambda session: session.visitor.when_closed(),
            max_calls=1,
            **registry,
        )


def test_peer_limit_spans_every_extension():
    """
    max_connections_per_peer counts one address over every port of the manager: the
    connection past it is refused on another extension too, counted on the manager.
    """
    s = Setup(leg_options={"max_connections_per_peer": 3})
    a = run(s.manager.add(ext()))
    b = run(s.manager.add(ext(id=2, ai=9000, ret=9001)))
    s.call(a)
    s.call(a, port="return")
    s.call(b)
    assert b.ai_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5556)) is None
    assert s.manager.refused["too_many_from_peer"] == 1
    assert s.manager.peers["127.0.0.1"] == 3


def test_busy_calls_over_max_busy_are_closed():
    """
    Turned-away calls count against max_busy: past it a call is closed at once with
    busy_overflow (no prompt, no session), while the admitted and the busy calls go on.
    """
    s = BusySetup(max_busy=1)
    svc = run(s.manager.add(ext()))
    admitted, ta = s.call(svc)
    busy, tb = s.call(svc)
    overflow, to = s.call(svc)
    assert [s.registry.active(), s.registry.busy()] == [1, 1]
    assert to.disconnecting and overflow.close_reason == "busy_overflow"
    assert overflow.uuid not in s.registry.sessions
    assert not ta.disconnecting and not tb.disconnecting
    assert s.manager.refused["busy_overflow"] == 1


def test_busy_call_closed_after_busy_max_s():
    """A turned-away call still open after busy_max_s is closed as busy_timeout, and ends."""
    s = BusySetup(busy_max_s=10.0)
    svc = run(s.manager.add(ext()))
    s.call(svc)
    busy, tb = s.call(svc)
    s.reactor.advance(9.9)
    assert not tb.disconnecting
    s.reactor.advance(0.2)
    assert tb.disconnecting and busy.close_reason == "busy_timeout"
    busy.connectionLost()
    assert s.registry.busy() == 0 and s.registry.turned_away == 1
    assert s.manager.refused["busy_timeout"] == 1


def test_admitted_call_has_no_busy_deadline():
    """busy_max_s applies to turned-away calls only: an admitted call outlives it."""
    s = BusySetup(busy_max_s=10.0)
    svc = run(s.manager.add(ext()))
    leg, t = s.call(svc)
    s.reactor.advance(11.0)
    assert not t.disconnecting


@pytest_twisted.ensureDeferred
async def test_restart_on_same_ports_over_real_tcp_keeps_calls():
    """
    `restart` of a healthy extension on its own ports (the README's `audiosocket-admin
    restart 2`) stops listening and listens again on the same ports, clears any error, and
    leaves a call in progress on its connection.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    from audiosocket.clock import AudioClock
    from audiosocket.extension import ExtensionManager
    from test_service import free_ports

    ai, ret = free_ports(2)
    clock = AudioClock(reactor=reactor)
    clock.startService()
    manager = ExtensionManager(clock=clock, on_leg=lambda svc, leg: None, reactor=reactor)
    manager.startService()
    try:
        svc = await manager.add(ext(ai=ai, ret=ret))
        caller = Protocol()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ai), caller)
        while not svc.legs:
            await deferLater(reactor, 0.01, lambda: None)
        await manager.restart(1)
        assert (svc.status, svc.error) == (LISTENING, None)
        assert (svc.bound_ai_port, svc.bound_return_port) == (ai, ret)
        assert caller.connected and len(svc.legs) == 1
        second = Protocol()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ai), second)
        second.transport.loseConnection()
        caller.transport.loseConnection()
    finally:
        manager.force_on_stop = True
        await manager.stopService()
        clock.stopService()
        while svc.legs:
            await deferLater(reactor, 0.01, lambda: None)


def test_restart_on_same_ports_closes_before_listening():
    """A restart closes the old listeners first: a port cannot be listened on twice."""
    s = Setup()
    svc = run(s.manager.add(ext()))
    s.reactor.busy |= s.reactor.open  # what the kernel says while the old ports are open
    original = s.reactor.listenTCP

    def listen(port, factory, backlog=50, interface=""):
        s.reactor.busy = set(s.reactor.open)
        return original(port, factory, backlog, interface)

    s.reactor.listenTCP = listen
    run(s.manager.restart(1))
    assert (svc.status, svc.error) == (LISTENING, None)
    assert s.reactor.open == {8080, 8081}


def test_failed_update_leaves_no_stale_error():
    """A rebind refused as busy leaves the extension listening on its old ports with no error."""
    s = Setup()
    run(s.manager.add(ext()))
    s.reactor.busy.add(9091)
    with pytest.raises(Conflict):
        run(s.manager.update(ext(ai=9090, ret=9091)))
    described = s.manager.get(1).describe()
    assert described["status"] == LISTENING and "error" not in described


def test_failed_extension_is_retried_with_capped_backoff():
    """
    An extension whose port is taken at start-up is retried after 1 s, then 2, 4, ... at
    most retry_max_s apart, and listens (with its error cleared) once the port is free.
    """
    s = Setup()
    s.manager._retry_max_s = 4.0
    s.reactor.busy.add(8080)
    run(s.manager.load([ext()]))
    svc = s.manager.get(1)
    delays = []
    for _ in range(4):
        assert svc.status == FAILED
        (retry,) = [c for c in s.reactor.getDelayedCalls() if c.func == s.manager._retry]
        delays.append(retry.getTime() - s.reactor.seconds())
        s.reactor.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 4.0]
    s.reactor.busy.clear()
    s.reactor.advance(4.0)
    assert (svc.status, svc.error) == (LISTENING, None)
    assert s.reactor.open == {8080, 8081}
    assert not [c for c in s.reactor.getDelayedCalls() if c.func == s.manager._retry]


def test_removing_a_failed_extension_stops_its_retries():
    """A failed extension that is removed is no longer retried."""
    s = Setup()
    s.reactor.busy.add(8080)
    run(s.manager.load([ext()]))
    run(s.manager.remove(1))
    assert not [c for c in s.reactor.getDelayedCalls() if c.func == s.manager._retry]
