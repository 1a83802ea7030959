"""
Tests for L{audiosocket.metrics}: unit tests of the conversions and timing wrappers with a
L{Clock}, and integration tests scraping C{GET /metrics} of the real service (real TCP, a
real redis-server) and parsing it with prometheus_client's own text parser.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from audiosocket.callclient import CallOptions, place_call
from audiosocket.clock import GAP_BUCKETS_MS, Histogram
from audiosocket.metrics import (
    Metrics,
    histogram_buckets,
    timed_nlu,
    timed_stt,
    timed_tts,
)
from audiosocket.speech.tts import ITTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_service import config_for, finished, free_ports, started, stopped  # noqa: E402

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")


# ---------------------------------------------------------------- units


def test_histogram_buckets_are_cumulative_seconds():
    """
    The clock's per-bucket millisecond counts become cumulative Prometheus buckets in
    seconds, a value equal to a bound counting in that bound's bucket, ending with +Inf.
    """
    h = Histogram()
    for ms in (1.0, 20.0, 21.0, 21.5, 5000.0):
        h.observe(ms)
    buckets = dict(histogram_buckets(h))
    assert list(buckets)[0] == "0.005" and list(buckets)[-1] == "+Inf"
    assert len(buckets) == len(GAP_BUCKETS_MS) + 1
    assert buckets["0.005"] == 1
    assert buckets["0.021"] == 3
    assert buckets["0.025"] == 4
    assert buckets["1.0"] == 4
    assert buckets["+Inf"] == 5


class _SlowTTS:
    name = "slow"

    def __init__(self, clock):
        self.clock = clock
        self.pending = []

    def synthesize(self, text, rate):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def preload(self, texts, rate):
        return defer.succeed(len(list(texts)))


class _Server:
    """The parts of a DoormanService the collector reads, empty."""

    def __init__(self, clock):
        from collections import Counter

        from audiosocket.clock import AudioClock

        self._reactor = clock
        self.clock = AudioClock(reactor=clock)
        self.manager = type("M", (), {"extensions": {}, "refused": Counter()})()
        self.registry = type("R", (), {"sessions": {}, "turned_away": 0})()
        self.store = type("S", (), {"available": True})()


def _samples(metrics: Metrics, name: str) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_timed_tts_observes_the_wait():
    """
    L{timed_tts} provides L{ITTS}, passes other attributes through, and records how long
    the caller waited for the synthesis (reactor time, 0.3 s here) in the TTS histogram.
    """
    clock = Clock()
    metrics = Metrics(_Server(clock), reactor=clock)
    inner = _SlowTTS(clock)
    tts = timed_tts(inner, metrics)
    verifyObject(ITTS, tts)
    assert tts.name == "slow"
    d = tts.synthesize("olá", 8000)
    clock.advance(0.3)
    inner.pending[0].callback(b"\0\0")
    assert d.result == b"\0\0"
    assert _samples(metrics, "audiosocket_tts_seconds_count") == {(): 1.0}
    assert _samples(metrics, "audiosocket_tts_seconds_sum")[()] == 0.3
    buckets = _samples(metrics, "audiosocket_tts_seconds_bucket")
    assert buckets[(("le", "0.25"),)] == 0 and buckets[(("le", "0.5"),)] == 1


def test_timed_stt_and_nlu_observe_failures_too():
    """
    A failed transcription or decision is timed as well (the failure passes through to the
    caller), and L{timed_stt}/L{timed_nlu} leave a missing (keypad-only) part missing.
    """
    clock = Clock()
    metrics = Metrics(_Server(clock), reactor=clock)

    class Failing:
        name = "x"

        def transcribe(self, pcm, rate):
            return defer.fail(ValueError("no"))

        def extract(self, text, directory=None):
            return defer.succeed(None)

        def decide(self, text):
            return defer.fail(ValueError("no"))

    stt, nlu = timed_stt(Failing(), metrics), timed_nlu(Failing(), metrics)
    failures = []
    stt.transcribe(b"", 8000).addErrback(failures.append)
    nlu.decide("sim").addErrback(failures.append)
    nlu.extract("101", None)
    assert len(failures) == 2
    assert _samples(metrics, "audiosocket_stt_seconds_count") == {(): 1.0}
    assert _samples(metrics, "audiosocket_nlu_seconds_count") == {
        (("operation", "decide"),): 1.0,
        (("operation", "extract"),): 1.0,
    }
    assert timed_stt(None, metrics) is None and timed_nlu(None, metrics) is None


def test_call_ended_counts_outcome_answer_and_timings():
    """
    A finished session counts under its condominium and outcome; a dialed call whose
    resident answered moves both the dialed and answered counters and the two timing
    histograms; a call never dialed moves neither.
    """
    clock = Clock()
    metrics = Metrics(_Server(clock), reactor=clock)

    class Ext:
        condominium_id = 7

    class Sess:
        extension = Ext()
        started_at = 100.0

        def __init__(self, outcome, attempts, resident_at, decided_at):
            self.outcome, self.attempts = outcome, attempts
            self.resident_at, self.decided_at = resident_at, decided_at

        def legs(self):
            return []

    metrics.call_ended(Sess("authorized", 1, 108.0, 112.0))
    metrics.call_ended(Sess("unknown_apartment", 0, None, None))
    calls = _samples(metrics, "audiosocket_calls_total")
    assert calls == {
        (("condominium", "7"), ("outcome", "authorized")): 1.0,
        (("condominium", "7"), ("outcome", "unknown_apartment")): 1.0,
    }
    assert _samples(metrics, "audiosocket_calls_dialed_total") == {(("condominium", "7"),): 1.0}
    assert _samples(metrics, "audiosocket_calls_resident_answered_total") == {
        (("condominium", "7"),): 1.0
    }
    assert _samples(metrics, "audiosocket_call_resident_answer_seconds_sum") == {
        (("condominium", "7"),): 8.0
    }
    assert _samples(metrics, "audiosocket_call_decision_seconds_sum") == {
        (("condominium", "7"),): 12.0
    }


# ---------------------------------------------------------------- the real service


async def _scrape(svc) -> dict[str, object]:
    api = "http://127.0.0.1:{}".format(svc.api_port.getHost().port)
    response = await treq.get(api + "/metrics", persistent=False).addTimeout(5, reactor)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = await treq.text_content(response).addTimeout(5, reactor)
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(family, **labels) -> float:
    for sample in family.samples:
        if sample.labels == labels and not sample.name.endswith(("_created", "_bucket")):
            return sample.value
    raise AssertionError("no sample {} in {}".format(labels, family.samples))


def test_bound_reasons_are_refused_counter_labels():
    """
    Every bound's reason code counted on the manager shows as a label of
    audiosocket_refused_connections_total, and turned-away calls in progress as a gauge.
    """
    clock = Clock()
    server = _Server(clock)
    reasons = [
        "too_many_connections",
        "too_many_from_peer",
        "too_many_handshakes",
        "event_flood",
        "audio_flood",
        "slow_reader",
        "rate_not_allowed",
        "rate_flapping",
        "busy_overflow",
        "busy_timeout",
    ]
    for n, reason in enumerate(reasons, start=1):
        server.manager.refused[reason] += n
    busy = type("Busy", (), {"busy": True})()
    server.registry.sessions = {1: busy, 2: busy}
    metrics = Metrics(server, reactor=clock)
    refused = _samples(metrics, "audiosocket_refused_connections_total")
    assert refused == {(("reason", r),): float(n) for n, r in enumerate(reasons, start=1)}
    assert _samples(metrics, "audiosocket_calls_busy") == {(): 2.0}


@pytest_twisted.ensureDeferred
async def test_connection_limit_shows_in_the_scrape(redis_server, tmp_path):
    """
    On the real server with [limits] max_connections_per_port = 1, a second connection to
    the AI port is closed and the scrape counts it under reason too_many_connections.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Peer(Protocol):
        def __init__(self):
            self.lost = defer.Deferred()

        def connectionLost(self, reason):
            self.lost.callback(None)

    ai, ret = free_ports(2)
    svc = await started(
        config_for(redis_server.path, tmp_path, ai, ret, limits={"max_connections_per_port": 1})
    )
    peers = [Peer(), Peer()]
    try:
        for peer in peers:
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ai), peer)
        await peers[1].lost.addTimeout(5, reactor)
        families = await _scrape(svc)
    finally:
        peers[0].transport.loseConnection()
        await peers[0].lost.addTimeout(5, reactor)
        await stopped(svc)
    refused = families["audiosocket_refused_connections"]
    assert _value(refused, reason="too_many_connections") == 1
    assert _value(families["audiosocket_calls_busy"]) == 0


@pytest_twisted.ensureDeferred
async def test_metrics_scrape_parses_with_every_family(redis_server, tmp_path):
    """
    A scrape of an idle server parses with the real Prometheus parser and has every family
    the issue asks for, with per-extension gauges at 0 and Redis available.
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        families = await _scrape(svc)
    finally:
        await stopped(svc)
    for name in (
        "audiosocket_sessions_active",
        "audiosocket_legs_active",
        "audiosocket_frames_in",
        "audiosocket_frames_out",
        "audiosocket_frame_gap_seconds",
        "audiosocket_clock_late_ticks",
        "audiosocket_clock_skipped_frames",
        "audiosocket_clock_tick_lateness_seconds",
        "audiosocket_refused_connections",
        "audiosocket_calls_busy",
        "audiosocket_redis_available",
        "audiosocket_calls",
        "audiosocket_call_resident_answer_seconds",
        "audiosocket_call_decision_seconds",
        "audiosocket_calls_dialed",
        "audiosocket_calls_resident_answered",
        "audiosocket_stt_seconds",
        "audiosocket_tts_seconds",
        "audiosocket_nlu_seconds",
    ):
        assert name in families, name
    assert families["audiosocket_frame_gap_seconds"].type == "histogram"
    assert _value(families["audiosocket_sessions_active"], extension="1") == 0
    assert _value(families["audiosocket_legs_active"], extension="1", role="visitor") == 0
    assert _value(families["audiosocket_redis_available"]) == 1


@pytest_twisted.ensureDeferred
async def test_counters_move_after_a_call(redis_server, tmp_path):
    """
    While a call is up its session and visitor leg show on extension 1; after it hangs up
    the call is counted under its condominium and outcome, and the frames it sent and
    received stay counted (counters never go back when a leg closes).
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        call = defer.Deferred.fromCoroutine(
            place_call(CallOptions(host="127.0.0.1", port=ai, hangup_after=1.5), reactor)
        )
        await svc.registry.when_started().addTimeout(10, reactor)
        during = await _scrape(svc)
        report = await call.addTimeout(10, reactor)
        await finished(svc, 1)
        after = await _scrape(svc)
    finally:
        await stopped(svc)
    assert report.connected
    assert _value(during["audiosocket_sessions_active"], extension="1") == 1
    assert _value(during["audiosocket_legs_active"], extension="1", role="visitor") == 1
    assert _value(after["audiosocket_sessions_active"], extension="1") == 0
    assert _value(after["audiosocket_calls"], condominium="1", outcome="abandoned") == 1
    frames_out = _value(after["audiosocket_frames_out"])
    assert frames_out >= report.frames_received
    assert frames_out >= _value(during["audiosocket_frames_out"])
    assert _value(after["audiosocket_frames_in"]) >= 0.8 * report.frames_sent
    gaps = after["audiosocket_frame_gap_seconds"]
    count = [s.value for s in gaps.samples if s.name.endswith("_count")][0]
    # One gap per send after the first; a late tick sends up to 3 frames in one send.
    late = _value(after["audiosocket_clock_late_ticks"])
    assert frames_out - 2 - 2 * late <= count <= frames_out


@pytest_twisted.ensureDeferred
async def test_labels_stay_low_cardinality(redis_server, tmp_path):
    """
    After calls with random UUIDs, no label value in the scrape is a UUID, and the only
    label names are the small fixed set (extension, role, condominium, outcome, reason,
    operation, le).
    """
    ai, ret = free_ports(2)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        calls = [
            defer.Deferred.fromCoroutine(
                place_call(CallOptions(host="127.0.0.1", port=ai, hangup_after=0.5), reactor)
            )
            for _ in range(3)
        ]
        await defer.gatherResults(calls).addTimeout(10, reactor)
        await finished(svc, 3)
        families = await _scrape(svc)
    finally:
        await stopped(svc)
    names, values = set(), set()
    for family in families.values():
        for sample in family.samples:
            names.update(sample.labels)
            values.update(sample.labels.values())
    assert names <= {"extension", "role", "status", "condominium", "outcome", "reason", "operation", "le"}
    assert not [v for v in values if UUID_RE.search(v)]
    assert _value(families["audiosocket_calls"], condominium="1", outcome="abandoned") == 3


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not met within {} s".format(timeout))
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest_twisted.ensureDeferred
async def test_failed_extension_shows_in_healthz_and_metrics_and_recovers(redis_server, tmp_path):
    """
    An extension whose AI port is taken at start-up makes /healthz answer 503 "degraded"
    naming it, shows as status="failed" in audiosocket_extension_status, and is retried:
    once the port is free it listens and /healthz is "ok" again.
    """
    import json
    import socket

    ai, ret = free_ports(2)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", ai))
    squatter.listen(1)
    svc = await started(config_for(redis_server.path, tmp_path, ai, ret))
    try:
        api = "http://127.0.0.1:{}".format(svc.api_port.getHost().port)
        response = await treq.get(api + "/healthz", persistent=False).addTimeout(5, reactor)
        body = json.loads(await treq.content(response))
        assert response.code == 503
        assert body["status"] == "degraded"
        assert [e["id"] for e in body["failed_extensions"]] == [1]
        assert str(ai) in body["failed_extensions"][0]["error"]
        status = (await _scrape(svc))["audiosocket_extension_status"]
        assert _value(status, extension="1", status="failed") == 1
        assert _value(status, extension="1", status="listening") == 0
        squatter.close()
        await _wait_for(lambda: svc.manager.get(1).status == "listening")
        response = await treq.get(api + "/healthz", persistent=False).addTimeout(5, reactor)
        assert response.code == 200
        assert json.loads(await treq.content(response)) == {"status": "ok"}
        status = (await _scrape(svc))["audiosocket_extension_status"]
        assert _value(status, extension="1", status="listening") == 1
    finally:
        squatter.close()
        await stopped(svc)


def test_gate_openings_are_counted_by_who_and_result():
    """audiosocket_gate_opens_total counts each open the gate made or withheld, by condominium,
    who authorized it and what the actuator did."""
    from audiosocket.config import GateConfig
    from audiosocket.gate import GateOpener, OpenRequest
    from tests.flowkit import ScriptedDialer

    clock = Clock()
    server = _Server(clock)
    server.gate = GateOpener(dialer=ScriptedDialer(), http=None, secret={}.get, reactor=clock)
    dtmf = GateConfig(kind="dtmf", digits="9")
    request = OpenRequest(condominium_id=3, authorized_by="resident", evidence="dtmf:1",
                          uuid="8a3f2d8e-56a4-4b3b-9b1e-1f0c2e3d4a5b")
    server.gate.open(dtmf, request)
    server.gate.open(dtmf, request)
    server.gate.withheld(dtmf, request, "the visitor hung up")
    metrics = Metrics(server, reactor=clock)
    assert _samples(metrics, "audiosocket_gate_opens_total") == {
        (("authorized_by", "resident"), ("condominium", "3"), ("result", "handed_off")): 2.0,
        (("authorized_by", "resident"), ("condominium", "3"), ("result", "not_opened")): 1.0,
    }
