"""The replication report, status by status, from canned coordination entries (no I/O)."""

from __future__ import annotations

from typing import Any

from pvs_protocol import coordination as co
from pvs_protocol.identity import ReplicaIdentity
from pvsd.replication import Holder, manifest_differences, replication_report

V1 = ReplicaIdentity(1, 10, 1 << 20, b"a" * 32, 16384)
V1_REMADE = ReplicaIdentity(1, 20, 1 << 20, b"b" * 32, 16384)
"""The same version made again later (``pvsctl vdisk manifest``): another manifest."""
V1_OTHER_BYTES = ReplicaIdentity(1, 10, 1 << 20, b"c" * 32, 16384)
V2 = ReplicaIdentity(2, 5, 1 << 20, b"d" * 32, 16384)


def holder(
    server: str, identity: ReplicaIdentity | None, state: str = "serving", *,
    damaged_at: int = -1, bad_blocks: int = 0, local: dict[str, Any] | None = None,
) -> Holder:
    entry = co.ReplicaEntry(
        "d", 1, False, True, 0, "", False, identity, damaged_at, bad_blocks
    )
    return Holder(server, state, entry, is_self=server == "a", local=local)


def statuses(entry: dict[str, Any]) -> dict[str, str]:
    return {replica["server"]: replica["status"] for replica in entry["replicas"]}


def replica(entry: dict[str, Any], server: str) -> dict[str, Any]:
    return next(r for r in entry["replicas"] if r["server"] == server)


def test_pending_identical_different_and_down() -> None:
    (entry,) = replication_report([
        holder("a", V1), holder("b", V1), holder("c", None), holder("d", V1_REMADE, "down"),
        holder("e", V1, "stopped"),
    ])
    assert statuses(entry) == {
        "a": "identical", "b": "identical", "c": "pending", "d": "different", "e": "identical",
    }
    assert entry["reference"] == V1.to_json(), "a newer manifest on a down server is not it"
    assert entry["failover_candidates"] == ["a", "b"]
    assert replica(entry, "d")["differences"] == ["timestamp"]
    assert replication_report([holder("a", None)])[0]["replicas"][0]["status"] == "pending"


def test_the_newest_manifest_is_the_reference_not_the_majority() -> None:
    (entry,) = replication_report([holder("a", V1), holder("b", V1), holder("c", V1_REMADE)])
    assert entry["reference"] == V1_REMADE.to_json()
    assert statuses(entry) == {"a": "different", "b": "different", "c": "identical"}
    assert replica(entry, "a")["differences"] == ["timestamp"]
    (entry,) = replication_report([holder("a", V2), holder("b", V1_REMADE)])
    assert replica(entry, "b")["differences"] == ["version", "timestamp"]


def test_content_is_named_only_when_it_is_the_one_difference() -> None:
    assert manifest_differences(V1, V1_OTHER_BYTES) == ["content"]
    assert manifest_differences(V1, V2) == ["version", "timestamp"]
    assert manifest_differences(V1, V1) == []


def test_a_damaged_copy_is_never_the_reference_and_says_where() -> None:
    local = {"damage": {"found_by": "scrub", "since": "2026-12-01T10:00:00+00:00"}}
    (entry,) = replication_report([
        holder("a", V2, damaged_at=32768, bad_blocks=3, local=local), holder("b", V1),
    ])
    assert entry["reference"] == V1.to_json(), "the damaged newer version is not the reference"
    assert statuses(entry) == {"a": "damaged", "b": "identical"}
    assert entry["damaged"] == ["a"] and entry["failover_candidates"] == ["b"]
    damage = replica(entry, "a")["damage"]
    assert damage == {
        "first_offset": 32768, "bad_blocks": 3, "block_size": 16384, "found_by": "scrub",
        "since": "2026-12-01T10:00:00+00:00",
    }
    assert replica(entry, "a")["identity"] == V2.to_json(), "still shown, for the admin"
    assert replica(entry, "b")["damage"] is None


def test_damage_without_the_servers_detail_still_shows_where() -> None:
    (entry,) = replication_report([holder("a", V1, damaged_at=0, bad_blocks=1)])
    assert statuses(entry) == {"a": "damaged"}
    assert entry["reference"] is None and entry["failover_candidates"] == []
    damage = replica(entry, "a")["damage"]
    assert (damage["first_offset"], damage["found_by"], damage["since"]) == (0, None, None)


def test_two_damaged_copies_do_not_outvote_one_good_copy() -> None:
    (entry,) = replication_report([
        holder("a", V1, damaged_at=4096, bad_blocks=1), holder("b", V1, damaged_at=4096,
                                                               bad_blocks=1),
        holder("c", V1),
    ])
    assert statuses(entry) == {"a": "damaged", "b": "damaged", "c": "identical"}
    assert entry["failover_candidates"] == ["c"] and not entry["high_availability"]


def test_scrub_progress_is_passed_through_per_server() -> None:
    scrub = {"running": True, "done": 1 << 19, "total": 1 << 20}
    (entry,) = replication_report([holder("a", V1, local={"scrub": scrub}), holder("b", V1)])
    assert replica(entry, "a")["scrub"] == scrub
    assert replica(entry, "b")["scrub"] is None
