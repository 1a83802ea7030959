"""
The quantiles behind the README's p99 figures: L{Histogram.quantile} and L{Histogram.merge}
(the clock's own lateness and per-leg gaps) and the benchmarks' C{bucket_quantile} (a p99 read
from Prometheus buckets), checked against numpy percentiles on known data.

A bucketed quantile is the upper bound of the bucket that holds the exact quantile, so the
reference is numpy's C{inverted_cdf} percentile (the smallest observation with at least
C{q * n} observations at or below it) mapped to its bucket's upper bound.
"""

from __future__ import annotations

import bisect
import random

import numpy as np
import pytest

from audiosocket.clock import GAP_BUCKETS_MS, Histogram
from audiosocket.metrics import histogram_buckets
from benchmarks.common import bucket_quantile

QS = (0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0)


def expected(data, q: float) -> float:
    """Upper bound of the bucket holding numpy's exact quantile (max for the open bucket)."""
    exact = float(np.percentile(np.asarray(data), q * 100, method="inverted_cdf"))
    i = bisect.bisect_left(GAP_BUCKETS_MS, exact)
    return GAP_BUCKETS_MS[i] if i < len(GAP_BUCKETS_MS) else max(data)


def datasets():
    rng = random.Random(20261205)
    return {
        # Gaps of a healthy call: 20 ms with jitter, a few late ones.
        "jitter": [rng.gauss(20.0, 0.6) for _ in range(5000)] + [45.0, 61.0, 130.0],
        # Spread over every bucket, the open one included.
        "spread": [rng.uniform(0.0, 1500.0) for _ in range(2000)],
        # Values exactly on bounds count in that bound's bucket.
        "on_bounds": list(GAP_BUCKETS_MS) * 3,
        "single": [27.0],
        "two_buckets": [1.0] * 99 + [200.0],
    }


@pytest.mark.parametrize("name", sorted(datasets()))
@pytest.mark.parametrize("q", QS)
def test_histogram_quantile_matches_numpy(name, q):
    """Histogram.quantile(q) is the bucket bound holding numpy's exact quantile of the data."""
    data = datasets()[name]
    h = Histogram()
    for ms in data:
        h.observe(ms)
    assert h.quantile(q) == expected(data, q)


def test_p99_of_one_late_frame_in_a_hundred_is_its_bucket():
    """
    99 gaps of 20 ms and one of 200 ms: p99 is 21 ms (the 99th value), p100 250 ms; a
    quantile off by one rank would report the late frame's bucket as p99.
    """
    h = Histogram()
    for ms in [20.0] * 99 + [200.0]:
        h.observe(ms)
    assert h.quantile(0.99) == 21.0
    assert h.quantile(0.995) == 250.0
    assert h.quantile(1.0) == 250.0


def test_quantile_of_the_open_bucket_is_the_largest_observation():
    """Beyond the last bound there is no upper bound: the largest value seen stands for it."""
    h = Histogram()
    for ms in (10.0, 3000.0, 7000.0):
        h.observe(ms)
    assert h.quantile(0.99) == 7000.0
    assert h.quantile(0.3) == 21.0


def test_empty_histogram_quantile_is_zero():
    """No observations: every quantile reads 0 (the status page shows 0, not an error)."""
    assert Histogram().quantile(0.99) == 0.0


def test_merge_equals_observing_everything_in_one():
    """Merging per-leg histograms gives the counts, sum, max and quantiles of all the data."""
    rng = random.Random(7)
    parts = [[rng.uniform(0, 300) for _ in range(rng.randint(0, 400))] for _ in range(6)]
    merged, whole = Histogram(), Histogram()
    for part in parts:
        h = Histogram()
        for ms in part:
            h.observe(ms)
            whole.observe(ms)
        merged.merge(h)
    everything = [ms for part in parts for ms in part]
    assert merged.counts == whole.counts
    assert merged.total == len(everything)
    assert merged.sum_ms == pytest.approx(sum(everything))
    assert merged.max_ms == max(everything)
    for q in QS:
        assert merged.quantile(q) == expected(everything, q)


def test_merge_into_empty_and_of_empty():
    """Merging an empty histogram changes nothing; merging into one copies the other."""
    h = Histogram()
    for ms in (3.0, 22.0):
        h.observe(ms)
    before = (list(h.counts), h.total, h.sum_ms, h.max_ms)
    h.merge(Histogram())
    assert (h.counts, h.total, h.sum_ms, h.max_ms) == before
    empty = Histogram()
    empty.merge(h)
    assert (empty.counts, empty.total, empty.sum_ms, empty.max_ms) == before


def prometheus_buckets(h: Histogram) -> list[tuple[float, float]]:
    """Per-bucket (upper bound in s, count), as the benchmarks read them off a scrape."""
    out, prev = [], 0.0
    for le, cumulative in histogram_buckets(h):
        out.append((float("inf") if le == "+Inf" else float(le), cumulative - prev))
        prev = cumulative
    return out


@pytest.mark.parametrize("name", sorted(datasets()))
@pytest.mark.parametrize("q", QS)
def test_bucket_quantile_matches_numpy(name, q):
    """
    The benchmarks' p99 from Prometheus buckets is the same bucket bound (in ms) as numpy's
    exact quantile, or inf when that quantile is in the open bucket.
    """
    data = datasets()[name]
    h = Histogram()
    for ms in data:
        h.observe(ms)
    want = expected(data, q)
    if want > GAP_BUCKETS_MS[-1]:
        want = float("inf")
    assert bucket_quantile(prometheus_buckets(h), q) == pytest.approx(want)


def test_bucket_quantile_edge_cases():
    """No observations: None. Leading empty buckets are skipped even for q = 0."""
    assert bucket_quantile([(0.005, 0.0), (float("inf"), 0.0)], 0.99) is None
    assert bucket_quantile([], 0.5) is None
    buckets = [(0.005, 0.0), (0.021, 0.0), (0.025, 4.0), (float("inf"), 0.0)]
    assert bucket_quantile(buckets, 0.0) == pytest.approx(25.0)
    assert bucket_quantile(buckets, 1.0) == pytest.approx(25.0)
