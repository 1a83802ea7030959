"""
The leg's direct send (L{audiosocket.leg.AudioSocketProtocol._write}, L{direct_socket}) over
real loopback TCP: a StringTransport never takes that path. A frame goes straight to the
socket when nothing is buffered, and queues behind buffered bytes otherwise (order kept).
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
