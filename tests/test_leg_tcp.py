"""
Legs over real loopback TCP.

The leg's direct send (L{audiosocket.leg.AudioSocketProtocol._write}, L{direct_socket}): a
StringTransport never takes that path. A frame goes straight to the socket when nothing is
buffered, and queues behind buffered bytes otherwise (order kept).

The bounds on a peer (L{audiosocket.leg}, C{[limits]}), each attack reproduced against a real
listening extension: too many connections on a port or from one address, a keypad flood, a
peer that never reads, a peer alternating sample rates, turned-away calls past C{max_busy}.
Each closes the offending connection only, counted by reason on the manager.
"""

from __future__ import annotations

import uuid

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from audiosocket import wire


class _Peer(Protocol):
    """The Asterisk side: sends a UUID, collects the frames the server sends."""

    def __init__(self):
        self.decoder = wire.Decoder(expect_uuid=False)
        self.frames = []
        self.got = None
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(wire.uuid_frame(uuid.uuid4()))

    def dataReceived(self, data):
        self.frames.extend(self.decoder.feed(data))
        if self.got is not None and len(self.frames) >= self.want:
            d, self.got = self.got, None
            d.callback(self.frames)

    def wait_frames(self, n):
        self.want = n
        if len(self.frames) >= n:
            return defer.succeed(self.frames)
        self.got = defer.Deferred()
        return self.got

    def connectionLost(self, reason):
        self.lost.callback(None)


async def _leg_pair():
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from audiosocket.clock import AudioClock
    from audiosocket.leg import LegFactory

    legs = []
    joined = defer.Deferred()

    def on_leg(leg):
        legs.append(leg)
        joined.callback(leg)

    factory = LegFactory("visitor", AudioClock(reactor=Clock()), on_leg, reactor=reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    peer = _Peer()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), peer)
    leg = await joined.addTimeout(5, reactor)
    return port, peer, leg


async def _close_pair(port, peer, leg):
    closed = leg.when_closed()
    peer.transport.loseConnection()
    await defer.gatherResults([peer.lost, closed]).addTimeout(5, reactor)
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_leg_tick_sends_at_once_on_tcp():
    """
    On a real TCP transport with nothing buffered, a tick's frame goes straight to the
    socket (the transport buffers nothing, no reactor turn needed) and arrives whole.
    """
    from audiosocket.leg import direct_socket

    port, peer, leg = await _leg_pair()
    try:
        assert direct_socket(leg.transport) is leg.transport.socket
        leg.tick(1, reactor.seconds())
        assert leg.transport._tempDataLen == 0 and not leg.transport.dataBuffer
        frames = await peer.wait_frames(1).addTimeout(5, reactor)
        assert [(f.kind, len(f.payload)) for f in frames] == [(wire.Kind.AUDIO, 320)]
    finally:
        await _close_pair(port, peer, leg)


@pytest_twisted.ensureDeferred
async def test_leg_tick_queues_behind_buffered_data():
    """
    When the transport already holds unsent bytes, the tick's frame is queued behind them,
    not sent ahead: the peer receives them in the order written.
    """
    port, peer, leg = await _leg_pair()
    loud = wire.audio(bytes([1, 2]) * 160)
    try:
        leg.transport.write(loud)  # buffered until the reactor's next turn
        leg.tick(1, reactor.seconds())
        assert leg.transport._tempDataLen == 2 * len(loud)
        frames = await peer.wait_frames(2).addTimeout(5, reactor)
        assert [f.payload for f in frames] == [bytes([1, 2]) * 160, bytes(320)]
    finally:
        await _close_pair(port, peer, leg)


def test_direct_socket_is_none_for_other_transports():
    """A test transport (or anything but plain TCP) keeps Twisted's buffered write."""
    from twisted.internet.testing import StringTransport

    from audiosocket.leg import direct_socket

    assert direct_socket(StringTransport()) is None


# ---------------------------------------------------------------- bounds, on a real extension


class _Client(Protocol):
    """A peer that sends C{data} on connect, counts what it receives, and sees the close."""

    def __init__(self, data: bytes = b""):
        self.data = data
        self.received = 0
        self.lost = defer.Deferred()
        self._more = []  # (byte count, Deferred)

    def connectionMade(self):
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += len(data)
        due = [(n, d) for n, d in self._more if self.received >= n]
        self._more = [(n, d) for n, d in self._more if self.received < n]
        for _, d in due:
            d.callback(self.received)

    def receives_more(self, frames: int = 3) -> defer.Deferred:
        """Fires once C{frames} more 8 kHz frames (20 ms each) have arrived from now."""
        d = defer.Deferred()
        self._more.append((self.received + frames * (wire.HEADER_SIZE + wire.frame_bytes(8000)), d))
        return d

    def connectionLost(self, reason):
        self.lost.callback(None)


class _Server:
    """
    An L{ExtensionManager} on the real reactor, listening on 127.0.0.1 port 0, its clock
    running; legs that send their UUID have their keypad events read (as the flow does) and
    are kept in C{legs}, or go to C{on_leg} when given.
    """

    def __init__(self, leg_options=None, on_leg=None):
        from audiosocket.clock import AudioClock
        from audiosocket.extension import ExtensionManager

        self.clock = AudioClock(reactor=reactor)
        self.legs = []
        self._joined = []
        self.clients = []
        self.manager = ExtensionManager(
            clock=self.clock,
            on_leg=on_leg or self._on_leg,
            reactor=reactor,
            bind="127.0.0.1",
            leg_options=leg_options,
        )

    def _on_leg(self, svc, leg):
        self.legs.append(leg)
        _drain(leg.events)
        waiters, self._joined = self._joined, []
        for d in waiters:
            d.callback(leg)

    def joined(self, n: int) -> defer.Deferred:
        """Fires once C{n} legs have sent their UUID."""

        async def wait():
            while len(self.legs) < n:
                d = defer.Deferred()
                self._joined.append(d)
                await d

        return defer.Deferred.fromCoroutine(wait()).addTimeout(5, reactor)

    async def start(self, extensions: int = 1):
        from extkit import ext

        self.clock.startService()
        self.manager.startService()
        self.services = [
            await self.manager.add(ext(id=i, ai=0, ret=0)) for i in range(1, extensions + 1)
        ]
        return self

    async def connect(self, port: int, data: bytes = b"") -> _Client:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = _Client(data)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.clients.append(client)
        return client

    async def stop(self):
        server_side = [
            leg.when_closed()
            for svc in self.manager.extensions.values()
            for factory in (svc.ai_factory, svc.return_factory)
            for leg in factory.connections
        ]
        for client in self.clients:
            if client.transport.connected:
                client.transport.loseConnection()
        await defer.gatherResults([c.lost for c in self.clients]).addTimeout(5, reactor)
        # The server side of every connection has seen it close too.
        await defer.gatherResults(server_side).addTimeout(5, reactor)
        await defer.maybeDeferred(self.manager.stopService).addTimeout(5, reactor)
        self.clock.stopService()


def _drain(queue):
    """Read C{queue} for ever (until its leg closes), as the flow's LegIO does."""

    async def read():
        try:
            while True:
                await queue.get()
        except defer.CancelledError:
            pass

    d = defer.Deferred.fromCoroutine(read())
    d.addErrback(lambda f: None)


def _call(data: bytes = b"") -> bytes:
    return wire.uuid_frame(uuid.uuid4()) + data


@pytest_twisted.ensureDeferred
async def test_connections_past_the_port_limit_are_closed():
    """
    With max_connections_per_port = 3, five peers connect to one AI port: three are
    served, the other two are closed at accept and counted as too_many_connections.
    """
    server = await _Server({"max_connections_per_port": 3}).start()
    try:
        port = server.services[0].bound_ai_port
        clients = [await server.connect(port, _call()) for _ in range(5)]
        await server.joined(3)
        await defer.gatherResults([c.lost for c in clients[3:]]).addTimeout(5, reactor)
        assert [c.lost.called for c in clients[:3]] == [False] * 3
        assert server.manager.refused["too_many_connections"] == 2
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_connections_past_the_peer_limit_are_closed_on_every_port():
    """
    max_connections_per_peer counts one address over every port of the process: with a
    limit of 2, a third connection from 127.0.0.1 to another extension is closed too.
    """
    server = await _Server({"max_connections_per_peer": 2}).start(extensions=2)
    try:
        a, b = server.services
        first = await server.connect(a.bound_ai_port, _call())
        second = await server.connect(b.bound_return_port, _call())
        third = await server.connect(b.bound_ai_port, _call())
        await third.lost.addTimeout(5, reactor)
        assert not first.lost.called and not second.lost.called
        assert server.manager.refused["too_many_from_peer"] == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_keypad_flood_closes_only_that_leg():
    """
    A peer sending 400 KB of '*' keypad frames (100,000 events) is closed as event_flood
    after its burst allowance; a call on the same port keeps being served.
    """
    server = await _Server().start()
    try:
        port = server.services[0].bound_ai_port
        good = await server.connect(port, _call())
        await server.joined(1)
        flooder = await server.connect(port, _call(wire.dtmf("*") * 100_000))
        await flooder.lost.addTimeout(5, reactor)
        bad = server.legs[1]
        assert bad.close_reason == "event_flood"
        assert server.manager.refused["event_flood"] == 1
        # The good call keeps getting its frames after the flood was closed.
        await good.receives_more(3).addTimeout(5, reactor)
        assert not good.lost.called
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_peer_that_never_reads_is_closed_with_bounded_buffer():
    """
    A 192 kHz peer with a small receive buffer that never reads: once the transport holds
    more than max_unsent_kb the leg stops writing, and after slow_reader_s it is aborted as
    slow_reader. What the server holds for it never exceeds the bound plus one frame.
    """
    import socket

    def unsent(t):  # what Twisted holds for the peer, not yet given to the kernel
        return len(t.dataBuffer) - t.offset + t._tempDataLen

    server = await _Server(
        {
            "rates": [8000, 192000],
            "max_unsent_kb": 16,
            "slow_reader_s": 0.5,
        }
    ).start()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.services[0].bound_ai_port))
        sock.sendall(_call(wire.audio(bytes(7680), 192000)))
        (leg,) = await server.joined(1).addCallback(lambda _: server.legs)
        # The kernel's send buffer is the kernel's bound (megabytes, autotuned); keep it small
        # so the test reaches the server's own buffering at once.
        leg.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        held = []
        tick = leg.tick

        def measured(frames, now):
            tick(frames, now)
            held.append(unsent(leg.transport))

        leg.tick = measured
        await leg.when_closed().addTimeout(30, reactor)
        assert leg.close_reason == "slow_reader"
        assert server.manager.refused["slow_reader"] == 1
        assert 16 * 1024 < max(held) <= 16 * 1024 + wire.HEADER_SIZE + 7680
    finally:
        sock.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_alternating_sample_rates_log_once_then_close():
    """
    A peer alternating 8 and 16 kHz frames logs one "switched" line (not a line a frame),
    and is closed as rate_flapping after max_rate_switches switches.
    """
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    server = await _Server({"max_rate_switches": 5}).start()
    try:
        frames = b"".join(
            wire.audio(bytes(wire.frame_bytes(r)), r) for r in [8000, 16000] * 10
        )
        client = await server.connect(server.services[0].bound_ai_port, _call(frames))
        await client.lost.addTimeout(5, reactor)
        (leg,) = server.legs
        assert leg.close_reason == "rate_flapping"
        assert server.manager.refused["rate_flapping"] == 1
    finally:
        globalLogPublisher.removeObserver(events.append)
        await server.stop()
    switched = [e for e in events if "switched audio" in e.get("log_format", "")]
    assert len(switched) == 1


@pytest_twisted.ensureDeferred
async def test_turned_away_calls_past_max_busy_are_closed():
    """
    One line (max_calls 1) and max_busy 1: the first call is served, the second hears
    "busy", the third and fourth are closed at once as busy_overflow; the first two stay.
    """
    from audiosocket.session import SessionRegistry

    registry = SessionRegistry(
        reactor=reactor,
        run_flow=lambda session: session.visitor.when_closed(),
        run_busy=lambda session: session.visitor.when_closed(),
        max_calls=1,
        max_busy=1,
    )
    server = await _Server(on_leg=registry.on_leg).start()
    try:
        port = server.services[0].bound_ai_port
        clients = [await server.connect(port, _call()) for _ in range(4)]
        await defer.gatherResults([c.lost for c in clients[2:]]).addTimeout(5, reactor)
        assert not clients[0].lost.called and not clients[1].lost.called
        assert (registry.active(), registry.busy()) == (1, 1)
        assert server.manager.refused["busy_overflow"] == 2
    finally:
        await server.stop()
    assert not registry.sessions
