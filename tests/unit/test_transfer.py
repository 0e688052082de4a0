"""The replication decisions of pvsd/transfer.py, from canned manifests and views (no I/O)."""

from __future__ import annotations

import json
import random

import pytest

from pvs_protocol import manifest as mf
from pvs_protocol.identity import ReplicaIdentity
from pvsd import transfer as tr
from pvsd.transfer import Copy, Kind, Refused, ReplicationPlan, Run, SiteServer

BLOCK = 4096


def manifest_of(data: bytes, block_size: int = BLOCK, version: int = 1) -> mf.Manifest:
    leaves = b"".join(mf.hash_blocks(data, block_size))
    return mf.Manifest.build(version, 123, len(data), block_size, leaves)


def leaves_of(data: bytes, block_size: int = BLOCK) -> bytes:
    return b"".join(mf.hash_blocks(data, block_size))


def image(blocks: int, zero: frozenset[int] = frozenset(), tail: int = 0, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    parts = [bytes(BLOCK) if index in zero else rng.randbytes(BLOCK) for index in range(blocks)]
    return b"".join(parts) + rng.randbytes(tail)


def kinds(plan: tr.BlockPlan) -> dict[int, Kind]:
    return {
        index: run.kind for run in plan.runs for index in range(run.first, run.first + run.count)
    }


# -- which blocks -----------------------------------------------------------------------------


def test_a_new_copy_fetches_every_block_that_is_not_zero() -> None:
    data = image(300, zero=frozenset({0, 5, 6, 200}))
    plan = tr.plan_blocks(manifest_of(data), None)
    assert set(kinds(plan)) == set(range(300)) - {0, 5, 6, 200}
    assert set(kinds(plan).values()) == {Kind.FETCH}
    assert plan.good_bytes == 4 * BLOCK
    assert plan.fetch_bytes == 296 * BLOCK and plan.zero_bytes == 0
    assert [(r.first, r.count) for r in plan.runs] == [(1, 4), (7, 193), (201, 99)]


def test_an_all_zero_image_needs_nothing_and_whole_zero_pages_are_skipped_at_once() -> None:
    data = bytes(BLOCK * (mf.FANOUT * 3 + 5) + 100)  # a short zero last block too
    plan = tr.plan_blocks(manifest_of(data), None)
    assert plan.complete and plan.good_bytes == len(data)


def test_a_partial_copy_fetches_only_the_blocks_that_do_not_match() -> None:
    data = image(260, zero=frozenset({10}), tail=1000)
    manifest = manifest_of(data)
    local = bytearray(len(data))
    local[: 100 * BLOCK] = data[: 100 * BLOCK]  # the first 100 blocks arrived
    local[150 * BLOCK : 151 * BLOCK] = data[150 * BLOCK : 151 * BLOCK]
    local[10 * BLOCK] = 7  # a block the manifest says is zero holds something else
    local[50 * BLOCK] ^= 1  # a block written wrongly (a crash mid-write)
    plan = tr.plan_blocks(manifest, leaves_of(bytes(local)))
    found = kinds(plan)
    assert found[10] is Kind.ZERO and found[50] is Kind.FETCH
    assert set(found) == {10, 50, *range(100, 150), *range(151, 261)}
    assert plan.fetch_bytes == (1 + 50 + 109) * BLOCK + 1000
    assert plan.good_bytes + plan.fetch_bytes + plan.zero_bytes == len(data)


def test_a_complete_copy_has_nothing_left() -> None:
    data = image(3, tail=10)
    plan = tr.plan_blocks(manifest_of(data), leaves_of(data))
    assert plan.complete and plan.good_bytes == len(data)


def test_an_empty_image_and_wrong_digest_counts() -> None:
    assert tr.plan_blocks(manifest_of(b""), None).complete
    with pytest.raises(ValueError, match="local digests"):
        tr.plan_blocks(manifest_of(image(2)), b"x" * 32)


def test_requests_are_cut_to_whole_blocks_within_the_bound() -> None:
    data = image(20, tail=5)
    plan = tr.plan_blocks(manifest_of(data), None)
    pieces = list(tr.requests(plan, 6 * BLOCK + 100))
    assert [(p.first, p.count) for p in pieces] == [(0, 6), (6, 6), (12, 6), (18, 3)]
    shape = plan.shape
    assert tr.range_bytes(shape, pieces[-1]) == (18 * BLOCK, 2 * BLOCK + 5)
    assert tr.request_bytes(0, BLOCK) == tr.MAX_REQUEST
    assert tr.request_bytes(1_000_000, BLOCK) == 61 * BLOCK  # a quarter second, whole blocks
    assert tr.request_bytes(100, BLOCK) == BLOCK
    assert tr.request_bytes(10**12, 1 << 20) == tr.MAX_REQUEST


def test_bad_blocks_are_named() -> None:
    data = image(8, tail=300)
    manifest = manifest_of(data)
    run = Run(4, 5, Kind.FETCH)
    start, length = tr.range_bytes(manifest.shape, run)
    piece = bytearray(data[start : start + length])
    assert tr.bad_blocks(manifest, run, bytes(piece)) == []
    piece[BLOCK + 3] ^= 0xFF
    piece[-1] ^= 0xFF
    assert tr.bad_blocks(manifest, run, bytes(piece)) == [5, 8]
    assert tr.bad_blocks(manifest, run, bytes(piece[:-1])) == [4, 5, 6, 7, 8]


# -- pacing and progress ----------------------------------------------------------------------


def test_the_bucket_keeps_the_average_rate() -> None:
    bucket = tr.TokenBucket(1000.0, now=0.0)
    assert bucket.reserve(250, 0.0) == 0.0  # the burst: a quarter second
    assert bucket.reserve(500, 0.0) == pytest.approx(0.5)
    now, sent = 0.5, 750
    for _ in range(20):  # a sender that sleeps as told keeps to the rate
        now += bucket.reserve(100, now)
        sent += 100
    assert sent / now == pytest.approx(1000, rel=0.15)
    assert tr.TokenBucket(0, now=0.0).reserve(10**9, 0.0) == 0.0
    bucket.set_rate(0, now)
    assert bucket.reserve(10**9, now) == 0.0


def test_the_bucket_does_not_save_up_while_idle() -> None:
    bucket = tr.TokenBucket(1000.0, now=0.0)
    assert bucket.reserve(250, 100.0) == 0.0
    assert bucket.reserve(250, 100.0) == pytest.approx(0.25)


def test_meter_rate_time_left_and_percent() -> None:
    data = image(100)
    manifest = manifest_of(data)
    local = bytearray(len(data))
    local[: 20 * BLOCK] = data[: 20 * BLOCK]
    meter = tr.Meter(len(data), now=0.0)
    meter.start(tr.plan_blocks(manifest, leaves_of(bytes(local))), now=10.0)
    assert meter.done == 20 * BLOCK and meter.percent == 20.0
    assert meter.seconds_left(10.0) is None  # no rate yet
    for second in range(1, 5):
        meter.fetched(10 * BLOCK, 10 * BLOCK, 10.0 + second)
    assert meter.rate(14.0) == pytest.approx(10 * BLOCK)
    assert meter.seconds_left(14.0) == pytest.approx(4.0)
    assert meter.percent == 60.0 and meter.transferred == 40 * BLOCK
    report = meter.to_json(14.0)
    assert report["bytes_done"] == 60 * BLOCK and report["bytes_to_fetch"] == 40 * BLOCK
    for second in range(5, 30):  # the window forgets old samples
        meter.fetched(BLOCK, BLOCK, 10.0 + second)
    assert meter.rate(39.0) == pytest.approx(BLOCK, rel=0.25)
    meter.stop(40.0)  # ended: the average over the whole copy, whenever asked
    assert meter.rate(1000.0) == pytest.approx(65 * BLOCK / 30)
    assert meter.to_json(1000.0)["seconds"] == 30.0


def test_rates_are_shown_with_the_units_of_pvsctl() -> None:
    assert tr.format_rate(0) == "unlimited"
    assert tr.format_rate(50 << 20) == "50.0 MiB/s"


# -- the record beside a partial copy ---------------------------------------------------------


def test_resume_record_round_trip_and_refusals() -> None:
    identity = ReplicaIdentity(3, 5, 1 << 20, b"r" * 32, 16384)
    record = tr.ResumeRecord("disk", 3, identity, "s1", 1e6, 42)
    assert tr.ResumeRecord.decode(record.encode()) == record
    default = tr.ResumeRecord("disk", 3, identity, "s1", None, 42, error="s1 sent bad blocks")
    assert tr.ResumeRecord.decode(default.encode()) == default
    other_version = json.loads(record.encode()) | {"version": 4}
    for bad in ("", "[]", '{"vdisk": "disk"}', json.dumps(other_version)):
        with pytest.raises(ValueError, match="malformed replication record"):
            tr.ResumeRecord.decode(bad)
    assert tr.partial_name("disk.v3.img") == ".disk.v3.partial"
    assert tr.record_name("disk.v3.img") == ".disk.v3.replication.json"


# -- which source, which destinations ---------------------------------------------------------


V1 = ReplicaIdentity(1, 10, 1 << 20, b"a" * 32)
V2 = ReplicaIdentity(2, 20, 1 << 20, b"b" * 32)
V2_LATER = ReplicaIdentity(2, 30, 1 << 20, b"c" * 32)


def server(
    name: str, copies: dict[int, Copy], *, up: bool = True, serving: bool | None = None,
    load: float = 0.0,
) -> SiteServer:
    return SiteServer(name, up, up if serving is None else serving, load, copies)


def test_the_newest_version_goes_from_the_least_loaded_good_holder() -> None:
    site = [
        server("s1", {1: Copy(V1), 2: Copy(V2)}, load=5),
        server("s2", {1: Copy(V1), 2: Copy(V2)}, load=1),
        server("s3", {1: Copy(V1)}),
        server("s4", {}),
    ]
    plan = tr.plan_replication(site, "disk", None, None)
    assert plan == ReplicationPlan("disk", 2, V2, "s2", ("s3", "s4"), ("s1", "s2"), ())
    plan = tr.plan_replication(site, "disk", 1, ["s4", "s1", "s4"])
    assert plan == ReplicationPlan("disk", 1, V1, "s3", ("s4",), ("s1",), ())


def test_the_source_carries_the_newest_manifest_and_no_damage() -> None:
    site = [
        server("s1", {2: Copy(V2_LATER, damaged=True)}),
        server("s2", {2: Copy(V2)}),
        server("s3", {2: Copy(V2_LATER)}, load=9),
        server("s4", {2: Copy(None)}),
    ]
    plan = tr.plan_replication(site, "disk", 2, None)
    assert isinstance(plan, ReplicationPlan)
    assert (plan.source, plan.identity) == ("s3", V2_LATER)
    assert plan.destinations == ("s1", "s2", "s4")  # s1 is repaired, s2 gets the newer one


def test_down_servers_are_left_out_of_all_but_refused_by_name() -> None:
    site = [server("s1", {1: Copy(V1)}), server("s2", {}, up=False), server("s3", {})]
    plan = tr.plan_replication(site, "disk", None, None)
    assert isinstance(plan, ReplicationPlan)
    assert (plan.destinations, plan.down) == (("s3",), ("s2",))
    refused = tr.plan_replication(site, "disk", None, ["s2"])
    assert isinstance(refused, Refused) and refused.status == 409
    assert "s2 is down" in refused.message and "start its pvsd" in refused.message


def test_bad_requests_are_refused_with_what_to_do() -> None:
    site = [server("s1", {1: Copy(V1), 2: Copy(V2)}), server("s2", {})]
    cases = [
        (tr.plan_replication([server("s1", {})], "nope", None, None), 404, "pvsctl vdisks"),
        (tr.plan_replication(site, "disk", 7, None), 404, "versions held: 1, 2"),
        (tr.plan_replication(site, "disk", 1, ["s9", "s2"]), 404, "known servers: s1, s2"),
        (tr.plan_replication(site, "disk", 1, []), 400, "--to SERVER"),
    ]
    for refused, status, text in cases:
        assert isinstance(refused, Refused), refused
        assert refused.status == status and text in refused.message


def test_a_maintenance_version_is_not_copied() -> None:
    site = [server("s1", {2: Copy(V2, maintenance=True)}), server("s2", {})]
    refused = tr.plan_replication(site, "disk", None, ["s2"])
    assert isinstance(refused, Refused) and refused.status == 409
    assert "in maintenance" in refused.message and "version promote disk" in refused.message


def test_no_good_copy_to_copy_from_says_why() -> None:
    damaged = [server("s1", {1: Copy(V1, damaged=True)}), server("s2", {})]
    refused = tr.plan_replication(damaged, "disk", None, ["s2"])
    assert isinstance(refused, Refused) and refused.status == 409
    assert "damaged on s1" in refused.message and "backup" in refused.message
    checking = [server("s1", {1: Copy(None)}), server("s2", {})]
    refused = tr.plan_replication(checking, "disk", None, ["s2"])
    assert isinstance(refused, Refused) and "still being checked on s1" in refused.message
    stopped = [server("s1", {1: Copy(V1)}, serving=False), server("s2", {})]
    refused = tr.plan_replication(stopped, "disk", None, ["s2"])
    assert isinstance(refused, Refused) and "s1, which is not serving" in refused.message
