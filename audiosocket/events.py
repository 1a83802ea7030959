# -*- test-case-name: tests.test_events,tests.test_dashboard -*-
"""
Live events for the operator's screen: C{GET /api/events}, server-sent events.

The L{EventHub} watches the session registry and the extension manager and turns what
changed into JSON events::

    event: session
    data: {"type": "session.started" | "session.changed" | "session.ended", "session": {...}}

    event: extension
    data: {"type": "extension.changed" | "extension.removed", "extension": {...}}

    event: access
    data: {"type": "access", "access": {...}}     (an access audit entry, as it is kept)

A stream starts with C{event: hello} and the whole picture (every session and extension as
"changed"), so a page that reconnects (after a restart of the server, say) can redraw.

It looks only while someone listens: a L{LoopingCall} every C{interval} seconds (default
0.5 s, so an event reaches a page within a second) compares what the registry and the
manager describe with what it saw last; an ended call is also pushed at once by the
registry's end observer. Nothing is added to the per-frame path of a call. The audio level
of each leg is quantized (L{LEVEL_STEP_DB}) so a steady call does not make an event a tick.

Bounded: at most C{max_subscribers} streams at once (one more is a 503), and each stream
has a queue of at most C{queue_cap} events; a consumer that does not read (its queue full,
or its transport's buffer holding more than C{queue_cap} events' worth) is dropped: its
connection is closed and C{refused["events_slow_consumer"]} counts it. The browser's
C{EventSource} reconnects by itself, and gets the whole picture again (every session and
extension as "changed") when it does.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from audiosocket.reactors import default_reactor

#: Audio levels are reported in steps of this many dB (an event only when a step changes).
LEVEL_STEP_DB = 6
LEVEL_FLOOR_DBFS = -90
QUEUE_CAP = 64
MAX_SUBSCRIBERS = 32
#: A comment line on every stream every this many polls (15 s at the default interval).
HEARTBEAT_POLLS = 30


def level_dbfs(frame: bytes, skip: int = 0) -> int:
    """
    The RMS level of a frame of signed 16-bit little-endian PCM, in dBFS (an integer, at
    least L{LEVEL_FLOOR_DBFS}); C{skip} leading bytes (a frame header) are ignored.
    Computed only when asked (the legs keep a reference to their last frame).
    """
    if len(frame) - skip < 2:
        return LEVEL_FLOOR_DBFS
    import numpy

    samples = numpy.frombuffer(frame, dtype="<i2", offset=skip, count=(len(frame) - skip) // 2)
    power = float(numpy.mean(samples.astype(numpy.float64) ** 2))
    if power <= 0.0:
        return LEVEL_FLOOR_DBFS
    return max(LEVEL_FLOOR_DBFS, round(10 * math.log10(power / (32768.0**2))))


def _quantized(session: dict) -> dict:
    """The parts of a session whose change makes an event (levels in coarse steps)."""
    legs = {}
    for role, leg in (session.get("legs") or {}).items():
        if leg is None:
            legs[role] = None
            continue
        legs[role] = (
            leg.get("closed"),
            leg.get("level_in_dbfs", 0) // LEVEL_STEP_DB,
            leg.get("level_out_dbfs", 0) // LEVEL_STEP_DB,
        )
    return {
        "state": session.get("state"),
        "outcome": session.get("outcome"),
        "facts": session.get("facts"),
        "attempts": session.get("attempts"),
        "last_heard": session.get("last_heard"),
        "legs": legs,
    }


def _ext_key(extension: dict) -> str:
    return json.dumps(extension, sort_keys=True, default=str)


def sse(event: str, data: dict) -> bytes:
    """One server-sent event (JSON data on one line)."""
    return "event: {}\ndata: {}\n\n".format(
        event, json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    ).encode("utf-8")


class Subscriber:
    """
    One C{/api/events} stream: a bounded queue drained into the request as the transport
    takes it.
    """

    def __init__(self, hub: "EventHub", request, cap: int):
        self.hub = hub
        self.request = request
        self.cap = cap
        self.queue: collections.deque[bytes] = collections.deque()
        self.closed = False
        #: Fires (with b"") when the server ends the stream; the route returns it.
        self.done = defer.Deferred()

    def put(self, chunk: bytes) -> None:
        if self.closed:
            return
        if len(self.queue) >= self.cap or self._unsent() > self.cap * 4096:
            self.hub.drop(self, "events_slow_consumer")
            return
        self.queue.append(chunk)
        self.flush()

    def _unsent(self) -> int:
        transport = getattr(getattr(self.request, "channel", None), "transport", None)
        buffer = getattr(transport, "dataBuffer", b"") or b""
        return len(buffer) + sum(len(b) for b in getattr(transport, "_tempDataBuffer", ()) or ())

    def flush(self) -> None:
        while self.queue and not self.closed:
            self.request.write(self.queue.popleft())


class EventHub:
    """
    Watches C{sessions} (C{describe_all()}) and C{extensions} (a callable returning the
    extension descriptions) and sends what changed to every subscriber.
    """

    log = Logger()

    def __init__(
        self,
        sessions,
        extensions: Callable[[], list[dict]],
        *,
        reactor=None,
        interval: float = 0.5,
        queue_cap: int = QUEUE_CAP,
        max_subscribers: int = MAX_SUBSCRIBERS,
        refused: collections.Counter | None = None,
    ):
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self._sessions = sessions
        self._extensions = extensions
        self.interval = interval
        self.queue_cap = queue_cap
        self.max_subscribers = max_subscribers
        self.refused = refused if refused is not None else collections.Counter()
        self.subscribers: list[Subscriber] = []
        self._seen_sessions: dict[str, dict] = {}
        self._seen_extensions: dict[int, dict] = {}
        self._loop: task.LoopingCall | None = None
        self.published = 0
        self._polls = 0
        #: Shut down: no new streams (the route answers 503).
        self.closed = False

    # ------------------------------------------------------------ subscribers

    def full(self) -> bool:
        return len(self.subscribers) >= self.max_subscribers

    def subscribe(self, request) -> Subscriber:
        """Start a stream on C{request}: the current picture first, then the changes."""
        sub = Subscriber(self, request, self.queue_cap)
        sessions, extensions = self._session_list(), self._extension_list()
        if not self.subscribers:
            self._seen_sessions = {d["uuid"]: _quantized(d) for d in sessions}
            self._seen_extensions = {d["id"]: _ext_key(d) for d in extensions}
        self.subscribers.append(sub)
        request.notifyFinish().addBoth(lambda _: self._gone(sub))
        sub.put(b"retry: 1000\n\n")
        sub.put(sse("hello", {"type": "hello"}))
        for data in sessions:
            sub.put(sse("session", {"type": "session.changed", "session": data}))
        for data in extensions:
            sub.put(sse("extension", {"type": "extension.changed", "extension": data}))
        if self._loop is None:
            self._loop = task.LoopingCall(self.poll)
            self._loop.clock = self._reactor
            self._loop.start(self.interval, now=False)
        return sub

    def _gone(self, sub: Subscriber) -> None:
        sub.closed = True
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        if not self.subscribers:
            self.stop()

    def drop(self, sub: Subscriber, reason: str) -> None:
        """Close a stream that does not keep up (counted in C{refused})."""
        self.refused[reason] += 1
        self.log.info("event stream dropped: {reason}", reason=reason)
        sub.closed = True
        sub.queue.clear()
        transport = getattr(getattr(sub.request, "channel", None), "transport", None)
        if transport is not None:
            transport.abortConnection()
        self._gone(sub)

    def stop(self, final: bool = False) -> None:
        """
        Stop watching (the last subscriber left, or shutdown): ends every stream. After a
        C{final} stop the hub takes no more subscribers (L{closed}).
        """
        if final:
            self.closed = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for sub in list(self.subscribers):
            sub.closed = True
            self.subscribers.remove(sub)
            if not sub.done.called:
                sub.done.callback(b"")

    # ------------------------------------------------------------ what changed

    def publish(self, event: str, data: dict) -> None:
        self.published += 1
        chunk = sse(event, data)
        for sub in list(self.subscribers):
            sub.put(chunk)

    def _session_list(self) -> list[dict]:
        return list(self._sessions.describe_all())

    def _extension_list(self) -> list[dict]:
        return list(self._extensions())

    def access(self, entry: dict) -> None:
        """A gate opening (attempted or done) was audited: pushed to every stream at once."""
        if self.subscribers:
            self.publish("access", {"type": "access", "access": entry})

    def session_ended(self, session) -> None:
        """The registry's end observer: push the end now rather than on the next poll."""
        if not self.subscribers:
            return
        data = session.describe()
        if self._seen_sessions.pop(data["uuid"], None) is not None:
            self.publish("session", {"type": "session.ended", "session": data})

    def poll(self) -> None:
        self._polls += 1
        if self._polls % HEARTBEAT_POLLS == 0:
            for sub in list(self.subscribers):
                sub.put(b": ping\n\n")  # finds a peer that went away silently
        seen: dict[str, dict] = {}
        for data in self._session_list():
            key = _quantized(data)
            seen[data["uuid"]] = key
            before = self._seen_sessions.get(data["uuid"])
            if before is None:
                self.publish("session", {"type": "session.started", "session": data})
            elif before != key:
                self.publish("session", {"type": "session.changed", "session": data})
        for uuid, _ in list(self._seen_sessions.items()):
            if uuid not in seen:
                self.publish("session", {"type": "session.ended", "session": {"uuid": uuid}})
        self._seen_sessions = seen
        extensions: dict[int, dict] = {}
        for data in self._extension_list():
            key = _ext_key(data)
            extensions[data["id"]] = key
            if self._seen_extensions.get(data["id"]) != key:
                self.publish("extension", {"type": "extension.changed", "extension": data})
        for ext_id in list(self._seen_extensions):
            if ext_id not in extensions:
                self.publish(
                    "extension", {"type": "extension.removed", "extension": {"id": ext_id}}
                )
        self._seen_extensions = extensions
