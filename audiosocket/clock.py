"""
One real-time 20 ms clock for every call leg.

Asterisk does not pace, buffer or fill the audio we send: a burst leaves as a burst and a
late frame is a gap the caller hears. So outbound audio is paced by a single clock on an
absolute schedule (C{start + n * 20 ms}, which is what L{LoopingCall} keeps: it never
accumulates drift the way C{sleep(20 ms)} in a loop does). On every tick each registered
leg gets exactly one frame. A late tick (the reactor was busy) sends the frames owed, up to
C{max_catchup}; beyond that the missed time is skipped, not burst, because a burst of
seconds of audio is garble to the caller and overflows a Local channel's queue.

The clock measures itself: lateness of each tick against its schedule, and per leg the
frames sent, ticks that owed more than one frame, and the largest gap between frames.
"""

from __future__ import annotations

import bisect
from typing import Protocol as TypingProtocol

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from audiosocket.reactors import default_reactor

TICK_S = 0.020

#: Upper bounds (ms) of the gap / lateness histogram buckets; the last bucket is open.
GAP_BUCKETS_MS = (5.0, 21.0, 25.0, 30.0, 40.0, 60.0, 100.0, 250.0, 1000.0)


class Ticked(TypingProtocol):
    """What the clock drives: a leg's outbound side."""

    def tick(self, frames: int, now: float) -> None:
        """Send C{frames} frames (1, or more when catching up after a late tick)."""


@define(eq=False)
class Histogram:
    """Fixed-bucket histogram of milliseconds (cheap enough for the per-frame path)."""

    bounds: tuple[float, ...] = GAP_BUCKETS_MS
    counts: list[int] = field(init=False)
    total: int = 0
    sum_ms: float = 0.0
    max_ms: float = 0.0

    def __attrs_post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, ms)] += 1
        self.total += 1
        self.sum_ms += ms
        if ms > self.max_ms:
            self.max_ms = ms

    def quantile(self, q: float) -> float:
        """
        Upper bound of the bucket holding quantile C{q} (the largest observation for the
        open bucket): coarse, but honest about which side of a bound a value lies.
        """
        if not self.total:
            return 0.0
        rank = q * self.total
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return self.bounds[i] if i < len(self.bounds) else self.max_ms
        return self.max_ms

    def merge(self, other: "Histogram") -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)


@define(eq=False)
class FrameStats:
    """Per-leg pacing statistics, kept by the leg's player and read by metrics and API."""

    frames: int = 0
    late_ticks: int = 0  # ticks on which this leg was owed more than one frame
    max_gap_ms: float = 0.0
    last_sent: float | None = None
    gaps: Histogram = field(factory=Histogram)

    def sent(self, frames: int, now: float) -> None:
        if self.last_sent is not None:
            gap = (now - self.last_sent) * 1000.0
            self.gaps.observe(gap)
            if gap > self.max_gap_ms:
                self.max_gap_ms = gap
        if frames > 1:
            self.late_ticks += 1
        self.frames += frames
        self.last_sent = now


class AudioClock(Service):
    """
    The single 20 ms tick that paces every leg's outbound audio.

    @ivar late_ticks: ticks that ran more than one interval late (owed > 1 frame).
    @ivar skipped_frames: frames not sent because a stall exceeded C{max_catchup}.
    @ivar lateness: histogram of how late each tick ran against its absolute schedule.
    """

    log = Logger()
    name = "clock"

    def __init__(self, reactor=None, interval: float = TICK_S, max_catchup: int = 3):
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self.interval = interval
        self.max_catchup = max_catchup
        # dict keeps insertion order and gives O(1) removal while iterating a snapshot.
        self._legs: dict[int, Ticked] = {}
        self._loop: LoopingCall | None = None
        self._ticks = 0
        self.late_ticks = 0
        self.skipped_frames = 0
        self.lateness = Histogram()

    def __len__(self) -> int:
        return len(self._legs)

    def add(self, leg: Ticked) -> None:
        """Start pacing C{leg}: it gets its first frame on the next tick."""
        self._legs[id(leg)] = leg

    def remove(self, leg: Ticked) -> None:
        self._legs.pop(id(leg), None)

    def startService(self):
        super().startService()
        self._ticks = 0
        self._loop = LoopingCall.withCount(self._tick)
        self._loop.clock = self._reactor
        d = self._loop.start(self.interval, now=False)
        d.addErrback(lambda f: self.log.failure("audio clock stopped", f))

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def _tick(self, count: int) -> None:
        now = self._reactor.seconds()
        self._ticks += count
        # Lateness against the first slot this tick pays for: after a stall, that is how long
        # the oldest owed frame waited (against the latest slot it would never exceed 20 ms).
        first_owed = self._loop.starttime + (self._ticks - count + 1) * self.interval
        self.lateness.observe(max(0.0, (now - first_owed) * 1000.0))
        frames = count
        if count > 1:
            self.late_ticks += 1
            if count > self.max_catchup:
                self.skipped_frames += count - self.max_catchup
                frames = self.max_catchup
        for leg in list(self._legs.values()):
            try:
                leg.tick(frames, now)
            except Exception:
                # One broken leg must not stop the clock for every other call.
                self.log.failure("leg {leg!r} failed on tick; removing it", leg=leg)
                self.remove(leg)
