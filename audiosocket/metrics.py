"""
Prometheus metrics for C{GET /metrics}.

Two kinds, to keep the per-frame path free of metric updates:

  - read at scrape time by L{_ServerCollector}: sessions and legs per extension, turned-away
    calls in progress, frames in and out, the clock's late ticks, skipped frames and tick
    lateness, the frame-gap histogram merged over the legs, gate openings by who authorized
    them and their result, refused connections by reason
    (malformed input, and every bound of L{audiosocket.leg} and the session registry:
    C{too_many_connections}, C{event_flood}, C{slow_reader}, C{busy_overflow}, ...),
    Redis availability;
  - updated on events (a call ended, a synthesis or a transcription finished): calls by
    outcome per condominium, time to the resident's answer and to the decision, dialed
    and answered calls (the answer rate is C{answered / dialed}), STT/NLU/TTS latency.

Labels are low-cardinality by construction: extension id, condominium id, outcome, reason,
role. Never a UUID.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from audiosocket.clock import GAP_BUCKETS_MS, Histogram
from audiosocket.extension import DRAINING, FAILED, LISTENING, STOPPED
from audiosocket.reactors import default_reactor

EXTENSION_STATUSES = (LISTENING, FAILED, DRAINING, STOPPED)

#: Buckets (s) of the call-timing histograms: time to the resident's answer, to decision.
CALL_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0)
#: Buckets (s) of the speech latency histograms (STT, NLU, TTS).
SPEECH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


def histogram_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """
    A clock L{Histogram} (milliseconds, per-bucket counts) as Prometheus cumulative buckets
    in seconds, ending with C{+Inf}.

    The clock's histogram puts C{ms} in the first bucket whose bound is C{>= ms}, which is
    Prometheus' C{le}.
    """
    buckets = []
    seen = 0
    for bound, n in zip(histogram.bounds, histogram.counts):
        seen += n
        buckets.append((_le(bound / 1000.0), seen))
    buckets.append(("+Inf", histogram.total))
    return buckets


def _le(seconds: float) -> str:
    return repr(round(seconds, 6))


def _histogram_family(name: str, documentation: str, histogram: Histogram):
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], histogram_buckets(histogram), histogram.sum_ms / 1000.0)
    return family


class _LegTotals:
    """
    Frames and gaps of every leg that ever was, kept monotonic for counters: a live leg is
    read at scrape time, and its figures move into the totals once it closes.
    """

    def __init__(self):
        self.frames_in = 0
        self.frames_out = 0
        self.gaps = Histogram(bounds=GAP_BUCKETS_MS)
        self._tracked: dict[int, Any] = {}
        self._counted: weakref.WeakSet = weakref.WeakSet()

    def track(self, leg) -> None:
        """Count C{leg}: now if it has closed, else when it does."""
        if id(leg) in self._tracked or leg in self._counted:
            return
        self._tracked[id(leg)] = leg
        leg.when_closed().addBoth(self._closed, leg)

    def _closed(self, _result, leg) -> None:
        self._tracked.pop(id(leg), None)
        if leg in self._counted:
            return
        self._counted.add(leg)
        self.frames_in += leg.frames_in
        self.frames_out += leg.stats.frames
        self.gaps.merge(leg.stats.gaps)

    def live(self) -> Iterable:
        return list(self._tracked.values())


class _ServerCollector:
    """Reads the server's own counters when Prometheus scrapes (zero cost per frame)."""

    def __init__(self, metrics: "Metrics"):
        self._metrics = metrics

    def describe(self):
        # Metric names are not known before the first collection (extensions come and go):
        # an empty describe keeps the registry from calling collect() at registration.
        return []

    def collect(self):
        m = self._metrics
        server = m.server
        manager = server.manager
        totals = m.legs

        sessions = GaugeMetricFamily(
            "audiosocket_sessions_active",
            "Visitor calls in progress (turned-away callers excluded)",
            labels=["extension"],
        )
        legs = GaugeMetricFamily(
            "audiosocket_legs_active",
            "AudioSocket connections open, by extension and role",
            labels=["extension", "role"],
        )
        per_ext: dict[int, int] = {}
        busy = 0
        for session in list(server.registry.sessions.values()):
            if session.busy:
                busy += 1
            else:
                ext_id = session.extension.id
                per_ext[ext_id] = per_ext.get(ext_id, 0) + 1
        status = GaugeMetricFamily(
            "audiosocket_extension_status",
            "1 for the extension's current status (listening, failed, draining, stopped), 0 for the others",
            labels=["extension", "status"],
        )
        for ext_id, svc in sorted(manager.extensions.items()):
            label = str(ext_id)
            for name in EXTENSION_STATUSES:
                status.add_metric([label, name], 1 if svc.status == name else 0)
            sessions.add_metric([label], per_ext.get(ext_id, 0))
            legs.add_metric([label, "visitor"], len(svc.ai_factory.connections))
            legs.add_metric([label, "resident"], len(svc.return_factory.connections))
            for leg in svc.legs:
                totals.track(leg)
        for ext_id, svc in sorted(getattr(manager, "draining", {}).items()):
            if ext_id not in manager.extensions:
                for name in EXTENSION_STATUSES:
                    status.add_metric([str(ext_id), name], 1 if svc.status == name else 0)
        yield sessions
        yield legs
        yield status
        yield GaugeMetricFamily(
            "audiosocket_calls_busy",
            "Turned-away calls hearing that the lines are busy now (bounded by max_busy)",
            value=busy,
        )

        live = totals.live()
        gaps = Histogram(bounds=GAP_BUCKETS_MS)
        gaps.merge(totals.gaps)
        frames_in, frames_out = totals.frames_in, totals.frames_out
        for leg in live:
            frames_in += leg.frames_in
            frames_out += leg.stats.frames
            gaps.merge(leg.stats.gaps)
        yield CounterMetricFamily(
            "audiosocket_frames_in", "Audio frames received from Asterisk", value=frames_in
        )
        yield CounterMetricFamily(
            "audiosocket_frames_out", "Audio frames sent to Asterisk", value=frames_out
        )
        yield _histogram_family(
            "audiosocket_frame_gap_seconds",
            "Time between consecutive frames sent on one leg",
            gaps,
        )

        clock = server.clock
        yield GaugeMetricFamily(
            "audiosocket_clock_legs", "Legs paced by the clock", value=len(clock)
        )
        yield CounterMetricFamily(
            "audiosocket_clock_late_ticks",
            "Clock ticks that ran more than one interval late",
            value=clock.late_ticks,
        )
        yield CounterMetricFamily(
            "audiosocket_clock_skipped_frames",
            "Frames skipped (not burst) after a stall longer than the catch-up allowance",
            value=clock.skipped_frames,
        )
        yield _histogram_family(
            "audiosocket_clock_tick_lateness_seconds",
            "How late each 20 ms tick ran against its absolute schedule",
            clock.lateness,
        )

        refused = CounterMetricFamily(
            "audiosocket_refused_connections",
            "Connections refused or closed for bad input or a bound hit, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(manager.refused.items()):
            refused.add_metric([str(reason)], n)
        yield refused
        yield CounterMetricFamily(
            "audiosocket_calls_turned_away",
            "Visitors told the lines are busy (max_calls reached)",
            value=server.registry.turned_away,
        )

        gate = getattr(server, "gate", None)
        if gate is not None:
            opens = CounterMetricFamily(
                "audiosocket_gate_opens",
                "Gate openings by who authorized them and what the actuator did "
                "(opened, handed_off, failed, not_opened)",
                labels=["condominium", "authorized_by", "result"],
            )
            for (condominium, authorized_by, result), n in sorted(gate.counts.items()):
                opens.add_metric([str(condominium), authorized_by, result], n)
            yield opens

        store = server.store
        yield GaugeMetricFamily(
            "audiosocket_redis_available",
            "1 if the last contact with Redis worked",
            value=1 if getattr(store, "available", False) else 0,
        )
        errors = getattr(store, "errors", None)
        if isinstance(errors, int):
            yield CounterMetricFamily(
                "audiosocket_redis_errors", "Redis commands that failed or timed out", value=errors
            )


class Metrics:
    """
    The server's metrics in their own registry (C{.registry}), so tests and several
    servers in one process never share counters.

    @param server: the L{DoormanService} (or anything with C{manager}, C{registry},
        C{clock}, C{store}); read at scrape time.
    """

    log = Logger()

    def __init__(self, server, reactor=None):
        self.server = server
        if reactor is None:
            reactor = getattr(server, "_reactor", None)
        reactor = default_reactor(reactor)
        self._reactor = reactor
        self.registry = CollectorRegistry(auto_describe=False)
        self.legs = _LegTotals()
        r = self.registry
        self.calls = Counter(
            "audiosocket_calls",
            "Finished calls by condominium and outcome",
            ["condominium", "outcome"],
            registry=r,
        )
        self.dialed = Counter(
            "audiosocket_calls_dialed",
            "Finished calls in which the resident was dialed at least once",
            ["condominium"],
            registry=r,
        )
        self.answered = Counter(
            "audiosocket_calls_resident_answered",
            "Finished calls in which the resident answered (answer rate: this / dialed)",
            ["condominium"],
            registry=r,
        )
        self.to_resident = PromHistogram(
            "audiosocket_call_resident_answer_seconds",
            "From the visitor's connect to the resident's leg joining",
            ["condominium"],
            buckets=CALL_BUCKETS_S,
            registry=r,
        )
        self.to_decision = PromHistogram(
            "audiosocket_call_decision_seconds",
            "From the visitor's connect to the resident's decision",
            ["condominium"],
            buckets=CALL_BUCKETS_S,
            registry=r,
        )
        self.stt = PromHistogram(
            "audiosocket_stt_seconds",
            "Speech recognition latency",
            buckets=SPEECH_BUCKETS_S,
            registry=r,
        )
        self.tts = PromHistogram(
            "audiosocket_tts_seconds",
            "Speech synthesis latency as the call waits for it (cache hits included)",
            buckets=SPEECH_BUCKETS_S,
            registry=r,
        )
        self.nlu = PromHistogram(
            "audiosocket_nlu_seconds",
            "Understanding latency (facts or decision)",
            ["operation"],
            buckets=SPEECH_BUCKETS_S,
            registry=r,
        )
        r.register(_ServerCollector(self))

    # ------------------------------------------------------------ events

    def call_ended(self, session) -> None:
        """A session has finished: count it and its timings, and its legs' frames."""
        condominium = str(session.extension.condominium_id)
        outcome = session.outcome or "error"
        self.calls.labels(condominium, outcome).inc()
        if session.attempts:
            self.dialed.labels(condominium).inc()
        start = session.started_at
        if session.resident_at is not None:
            self.answered.labels(condominium).inc()
            self.to_resident.labels(condominium).observe(max(0.0, session.resident_at - start))
        if session.decided_at is not None:
            self.to_decision.labels(condominium).observe(max(0.0, session.decided_at - start))
        for leg in session.legs():
            self.legs.track(leg)

    def observe_stt(self, seconds: float) -> None:
        self.stt.observe(seconds)

    def observe_tts(self, seconds: float) -> None:
        self.tts.observe(seconds)

    def observe_nlu(self, seconds: float, operation: str = "extract") -> None:
        self.nlu.labels(operation).observe(seconds)

    def seconds(self) -> float:
        return self._reactor.seconds()


# ---------------------------------------------------------------- timing wrappers


def _timed(d: Deferred, started: float, metrics: Metrics, observe) -> Deferred:
    def done(result):
        observe(metrics.seconds() - started)
        return result

    return d.addBoth(done)


class _Wrapper:
    """Passes every attribute it does not time (C{name}, C{preload}, C{clear}...) through."""

    def __init__(self, inner, metrics: Metrics):
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _interfaces():
    from audiosocket.flow.understand import INLU
    from audiosocket.speech.stt import ISTT
    from audiosocket.speech.tts import ITTS

    return ITTS, ISTT, INLU


_ITTS, _ISTT, _INLU = _interfaces()


@implementer(_ITTS)
class TimedTTS(_Wrapper):
    """An L{ITTS} whose C{synthesize} latency goes to C{audiosocket_tts_seconds}."""

    def synthesize(self, text: str, rate: int) -> Deferred:
        m = self._metrics
        return _timed(self._inner.synthesize(text, rate), m.seconds(), m, m.observe_tts)


@implementer(_ISTT)
class TimedSTT(_Wrapper):
    """An L{ISTT} whose C{transcribe} latency goes to C{audiosocket_stt_seconds}."""

    def transcribe(self, pcm: bytes, rate: int) -> Deferred:
        m = self._metrics
        return _timed(self._inner.transcribe(pcm, rate), m.seconds(), m, m.observe_stt)


@implementer(_INLU)
class TimedNLU(_Wrapper):
    """An L{INLU} whose C{extract} and C{decide} latencies go to C{audiosocket_nlu_seconds}."""

    def extract(self, text, directory=None) -> Deferred:
        m = self._metrics
        return _timed(
            self._inner.extract(text, directory),
            m.seconds(),
            m,
            lambda s: m.observe_nlu(s, "extract"),
        )

    def decide(self, text) -> Deferred:
        m = self._metrics
        return _timed(
            self._inner.decide(text), m.seconds(), m, lambda s: m.observe_nlu(s, "decide")
        )


def timed_tts(tts, metrics: Metrics) -> TimedTTS:
    """Wrap C{tts} so every synthesis is timed."""
    return TimedTTS(tts, metrics)


def timed_stt(stt, metrics: Metrics):
    """Wrap C{stt} so every transcription is timed (C{None} stays C{None}: keypad only)."""
    return None if stt is None else TimedSTT(stt, metrics)


def timed_nlu(nlu, metrics: Metrics):
    """Wrap C{nlu} so every extraction and decision is timed (C{None} stays C{None})."""
    return None if nlu is None else TimedNLU(nlu, metrics)
