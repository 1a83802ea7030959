"""
Tests for L{audiosocket.events}: the hub on a L{task.Clock} with fake streams (what it
sends, when it stops watching, how it drops a slow consumer), the level meter, and
C{GET /api/events} over real TCP against the real service while a call starts and ends.
"""

from __future__ import annotations

import collections
import json
import struct

import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from audiosocket import wire
from audiosocket.callclient import CallOptions, place_call
from audiosocket.events import LEVEL_FLOOR_DBFS, EventHub, level_dbfs
from test_service import config_for, free_ports, started, stopped


class FakeTransport:
    def __init__(self):
        self.dataBuffer = b""
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeRequest:
    """What the hub uses of a request: write, notifyFinish, channel.transport."""

    def __init__(self):
        self.written: list[bytes] = []
        self.channel = type("Channel", (), {})()
        self.channel.transport = FakeTransport()
        self._finished = defer.Deferred()

    def write(self, data):
        self.written.append(data)

    def notifyFinish(self):
        return self._finished

    def lose(self):
        self._finished.errback(Exception("connection lost"))

    def events(self) -> list[tuple[str, dict]]:
        out = []
        for chunk in self.written:
            text = chunk.decode()
            if text.startswith("event: "):
                head, data = text.strip().split("\n")
                out.append((head[len("event: ") :], json.loads(data[len("data: ") :])))
        return out

    def types(self) -> list[str]:
        return [data["type"] for _, data in self.events() if data["type"] != "hello"]


class FakeSessions:
    def __init__(self):
        self.sessions: dict[str, dict] = {}

    def describe_all(self):
        return [dict(s) for s in self.sessions.values()]


def session(uuid="u1", state="greeting", level_in=-90):
    return {
        "uuid": uuid,
        "state": state,
        "outcome": None,
        "facts": {},
        "attempts": 0,
        "legs": {
            "visitor": {"closed": False, "level_in_dbfs": level_in, "level_out_dbfs": -90},
            "resident": None,
        },
    }


def hub_with(**kwargs):
    clock = task.Clock()
    sessions = FakeSessions()
    extensions: list[dict] = []
    hub = EventHub(sessions, lambda: list(extensions), reactor=clock, **kwargs)
    return hub, clock, sessions, extensions


def test_level_of_silence_is_the_floor():
    """A silent frame, or none, reads as the floor."""
    assert level_dbfs(bytes(320)) == LEVEL_FLOOR_DBFS
    assert level_dbfs(b"") == LEVEL_FLOOR_DBFS


def test_level_of_full_scale_is_zero_dbfs():
    """A full-scale square wave is 0 dBFS; half of it about -6; a header is skipped."""
    full = struct.pack("<160h", *([32767, -32767] * 80))
    half = struct.pack("<160h", *([16384, -16384] * 80))
    assert level_dbfs(full) == 0
    assert level_dbfs(half) == -6
    assert level_dbfs(wire.audio(full, 8000), wire.HEADER_SIZE) == 0


def test_subscribe_sends_the_current_picture():
    """A new stream first gets its retry delay and hello, then every session and extension."""
    hub, clock, sessions, extensions = hub_with()
    sessions.sessions["u1"] = session()
    extensions.append({"id": 1, "status": "listening"})
    request = FakeRequest()
    hub.subscribe(request)
    assert request.written[0] == b"retry: 1000\n\n"
    assert request.events() == [
        ("hello", {"type": "hello"}),
        ("session", {"type": "session.changed", "session": session()}),
        ("extension", {"type": "extension.changed", "extension": {"id": 1, "status": "listening"}}),
    ]
    hub.stop()


def test_session_started_changed_ended():
    """A call that appears, changes state and goes makes started, changed, ended."""
    hub, clock, sessions, _ = hub_with()
    request = FakeRequest()
    hub.subscribe(request)
    sessions.sessions["u1"] = session()
    clock.advance(0.5)
    sessions.sessions["u1"] = session(state="collecting")
    clock.advance(0.5)
    del sessions.sessions["u1"]
    clock.advance(0.5)
    assert request.types() == ["session.started", "session.changed", "session.ended"]
    hub.stop()


def test_nothing_changed_nothing_sent():
    """Polls that find nothing new send nothing."""
    hub, clock, sessions, _ = hub_with()
    sessions.sessions["u1"] = session()
    request = FakeRequest()
    hub.subscribe(request)
    before = len(request.written)
    clock.pump([0.5] * 10)
    assert len(request.written) == before


def test_small_level_changes_are_not_events():
    """A level moving within its step makes no event; a jump of a step does."""
    hub, clock, sessions, _ = hub_with()
    sessions.sessions["u1"] = session(level_in=-42)
    request = FakeRequest()
    hub.subscribe(request)
    sessions.sessions["u1"] = session(level_in=-37)
    clock.advance(0.5)
    assert request.types() == ["session.changed"]  # only the initial picture
    sessions.sessions["u1"] = session(level_in=-20)
    clock.advance(0.5)
    assert request.types() == ["session.changed", "session.changed"]
    hub.stop()


def test_extension_changed_and_removed():
    """An extension whose status changes, then goes, makes changed then removed."""
    hub, clock, _, extensions = hub_with()
    extensions.append({"id": 1, "status": "listening"})
    request = FakeRequest()
    hub.subscribe(request)
    extensions[0] = {"id": 1, "status": "draining"}
    clock.advance(0.5)
    extensions.clear()
    clock.advance(0.5)
    assert request.types() == ["extension.changed", "extension.changed", "extension.removed"]
    hub.stop()


def test_ended_observer_pushes_at_once():
    """The registry's end observer sends session.ended without waiting for a poll."""
    hub, clock, sessions, _ = hub_with()
    sessions.sessions["u1"] = session()
    request = FakeRequest()
    hub.subscribe(request)

    class Ended:
        def describe(self):
            return dict(session(), state="ended", outcome="abandoned")

    del sessions.sessions["u1"]
    hub.session_ended(Ended())
    assert request.types()[-1] == "session.ended"
    clock.advance(0.5)
    assert request.types().count("session.ended") == 1
    hub.stop()


def test_access_entries_are_pushed_as_they_are_kept():
    """An access audit entry reaches every stream at once as event "access", privacy applied
    by the audit (the visitor's name gone with keep_visitor_names = false)."""
    import attrs

    from audiosocket.access import AccessLog
    from audiosocket.config import PrivacyConfig
    from audiosocket.store import MemoryStore

    hub, clock, _, _ = hub_with()
    privacy = attrs.evolve(PrivacyConfig(), keep_visitor_names=False)
    log = AccessLog(MemoryStore(reactor=clock), reactor=clock, privacy=lambda: privacy)
    log.add_observer(hub.access)
    log.add({"condominium_id": 1, "visitor": "Pedro", "authorized_by": "resident",
             "evidence": "dtmf:1", "result": "opened"})  # nobody listens: nothing queued
    request = FakeRequest()
    hub.subscribe(request)
    log.add({"condominium_id": 1, "visitor": "Pedro", "authorized_by": "resident",
             "evidence": "dtmf:1", "result": "opened"})
    assert request.types()[-1] == "access"
    pushed = [data for name, data in request.events() if name == "access"]
    assert len(pushed) == 1 and pushed[0]["access"]["visitor"] is None
    assert pushed[0]["access"]["result"] == "opened"
    hub.stop()


def test_watching_stops_with_the_last_stream():
    """No stream, no polling: the loop's DelayedCall goes with the last subscriber."""
    hub, clock, _, _ = hub_with()
    first, second = FakeRequest(), FakeRequest()
    hub.subscribe(first)
    hub.subscribe(second)
    assert clock.getDelayedCalls()
    first.lose()
    assert clock.getDelayedCalls()
    second.lose()
    assert clock.getDelayedCalls() == []
    assert hub.subscribers == []


def test_stop_ends_every_stream():
    """Shutdown: each stream's Deferred fires, so its response finishes."""
    hub, clock, _, _ = hub_with()
    subs = [hub.subscribe(FakeRequest()) for _ in range(3)]
    hub.stop()
    assert all(s.done.called for s in subs)
    assert clock.getDelayedCalls() == []


def test_slow_consumer_is_dropped():
    """
    A stream whose transport holds more than its cap's worth of unsent bytes is closed
    and counted (events_slow_consumer); the others keep their events.
    """
    refused = collections.Counter()
    hub, clock, sessions, _ = hub_with(refused=refused, queue_cap=4)
    slow, fast = FakeRequest(), FakeRequest()
    hub.subscribe(slow)
    hub.subscribe(fast)
    slow.channel.transport.dataBuffer = b"x" * (4 * 4096 + 1)
    sessions.sessions["u1"] = session()
    clock.advance(0.5)
    assert slow.channel.transport.aborted
    assert refused["events_slow_consumer"] == 1
    assert [s.request for s in hub.subscribers] == [fast]
    assert fast.types() == ["session.started"]
    hub.stop()


def test_streams_are_bounded():
    """The hub says when it is full (the route answers 503)."""
    hub, _, _, _ = hub_with(max_subscribers=2)
    hub.subscribe(FakeRequest())
    assert not hub.full()
    hub.subscribe(FakeRequest())
    assert hub.full()
    hub.stop()


class EventReader(protocol.Protocol):
    """Reads an HTTP response of server-sent events; fires on the first of a type."""

    def __init__(self, wanted: str, host: str):
        self.buffer = b""
        self.wanted = wanted
        self.host = host
        self.found = defer.Deferred()

    def connectionMade(self):
        self.transport.write(
            "GET /api/events HTTP/1.1\r\nHost: {}\r\n\r\n".format(self.host).encode()
        )

    def dataReceived(self, data):
        self.buffer += data
        if self.found.called:
            return
        for block in self.buffer.split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event["type"] == self.wanted:
                        self.found.callback(event)
                        return

    def connectionLost(self, reason):
        if not self.found.called:
            self.found.errback(reason)


@pytest_twisted.ensureDeferred
async def test_events_over_tcp_for_a_real_call(redis_server, tmp_path):
    """
    Over real TCP: a stream opened before a call gets session.started with the call's
    UUID (and its legs' audio levels) while it is in progress, and session.ended once it
    is over; the stream is a text/event-stream.
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    port = svc.api_port.getHost().port
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    try:
        starts = EventReader("session.started", "127.0.0.1")
        ends = EventReader("session.ended", "127.0.0.1")
        await connectProtocol(endpoint, starts)
        await connectProtocol(endpoint, ends)
        options = CallOptions(host="127.0.0.1", port=ai, hangup_after=3.0)
        call = defer.Deferred.fromCoroutine(place_call(options, reactor))
        started_event = await starts.found.addTimeout(20, reactor)
        ended_event = await ends.found.addTimeout(20, reactor)
        await call.addTimeout(20, reactor)
        assert b"text/event-stream" in starts.buffer.split(b"\r\n\r\n")[0]
    finally:
        for reader in (starts, ends):
            reader.transport.loseConnection()
        await stopped(svc)
    assert started_event["session"]["uuid"] == options.uuid
    visitor = started_event["session"]["legs"]["visitor"]
    assert isinstance(visitor["level_in_dbfs"], int)
    assert LEVEL_FLOOR_DBFS <= visitor["level_out_dbfs"] <= 0
    assert ended_event["session"]["uuid"] == options.uuid


class KeepAlive(protocol.Protocol):
    """An HTTP/1.1 client that keeps its connection and records what it receives."""

    def __init__(self):
        self.received = b""
        self.answered = defer.Deferred()
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_stopping_closes_keep_alive_connections(redis_server, tmp_path):
    """
    Over real TCP: a keep-alive connection opened before the service stops is closed by
    the stop, so a stopped server answers nothing more on it (a browser's next request,
    its event stream's reconnection included, goes to the next server).
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    port = svc.api_port.getHost().port
    client = KeepAlive()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    try:
        client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await client.answered.addTimeout(10, reactor)
    finally:
        await stopped(svc)
    await client.lost.addTimeout(10, reactor)
    assert client.received.startswith(b"HTTP/1.1 200")
