"""The request latency kept by pvsd's sessions (pvsd.metrics.RequestStats): bucket edges,
bursts counted at once, and the cumulative form Prometheus reads."""

from __future__ import annotations

from pvsd.metrics import LATENCY_BOUNDS, RequestStats


def cumulative(stats: RequestStats, op: str) -> dict[str, float]:
    return dict(next(buckets for name, buckets, _ in stats.histograms() if name == op))


def sums(stats: RequestStats) -> dict[str, float]:
    return {name: total for name, _, total in stats.histograms()}


def test_a_burst_counts_each_read_at_the_bursts_duration() -> None:
    stats = RequestStats()
    stats.reads(0.0003, 3)
    reads = cumulative(stats, "read")
    assert reads["0.00025"] == 0 and reads["0.0005"] == 3 and reads["+Inf"] == 3
    assert abs(sums(stats)["read"] - 0.0009) < 1e-12
    assert cumulative(stats, "write")["+Inf"] == 0


def test_requests_answered_on_their_own_count_once_each_under_their_operation() -> None:
    stats = RequestStats()
    stats.observe("digests", 0.00002)
    stats.observe("flush", 0.003)
    stats.observe("read", 0.02)  # a read that went to a worker thread
    assert cumulative(stats, "digests")["5e-05"] == 1
    assert cumulative(stats, "flush")["0.0025"] == 0 and cumulative(stats, "flush")["0.005"] == 1
    assert cumulative(stats, "read")["+Inf"] == 1
    assert sums(stats)["flush"] == 0.003


def test_bucket_edges_are_inclusive_and_the_slowest_land_in_inf() -> None:
    stats = RequestStats()
    for bound in LATENCY_BOUNDS:
        stats.observe("write", bound)  # exactly on an edge: that bucket (le)
    stats.observe("write", 60.0)
    stats.observe("nothing", 1.0)  # not an operation of ours: ignored
    buckets = cumulative(stats, "write")
    for index, bound in enumerate(LATENCY_BOUNDS):
        assert buckets[f"{bound:g}"] == index + 1
    assert buckets["+Inf"] == len(LATENCY_BOUNDS) + 1
