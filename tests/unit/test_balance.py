"""The placement policy, rule by rule, without any I/O."""

from __future__ import annotations

import ipaddress
from collections import Counter

from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode, SubnetAffinity
from pvsd.balance import (
    Placement,
    Refusal,
    Replica,
    ServerView,
    choose,
    failover_allowed,
    preferred_identity,
)

A = ReplicaIdentity(1, 1_000, 4096, b"a" * 32)
A_TOUCHED = ReplicaIdentity(1, 2_000, 4096, b"a" * 32)
B_NEWER = ReplicaIdentity(2, 3_000, 4096, b"b" * 32)
B_OLDER = ReplicaIdentity(2, 500, 4096, b"c" * 32)
"""Version 2 made before A was: the version wins over the time."""
NET1 = ipaddress.ip_network("10.1.0.0/24")
NET2 = ipaddress.ip_network("10.2.0.0/24")


def server(
    name: str, *, targets: int = 0, power: float = 1.0, serving: bool = True,
    identity: ReplicaIdentity | None = A, subnets: tuple[ipaddress.IPv4Network, ...] = (),
    **settings: object,
) -> ServerView:
    version = identity.version if identity is not None else 1
    replica = Replica(identity, version=version, **settings)  # type: ignore[arg-type]
    return ServerView(
        name, f"{name}:6910", serving, power, targets, subnets, {"disk": {version: replica}}
    )


def placed(result: Placement | Refusal) -> str:
    assert isinstance(result, Placement), result
    return result.server


def test_least_busy_wins() -> None:
    site = [server("s1", targets=3), server("s2", targets=1), server("s3", targets=2)]
    assert placed(choose(site, "disk", me="s1")) == "s2"


def test_power_rating_weights_the_load() -> None:
    site = [server("s1", targets=4, power=1.0), server("s2", targets=6, power=2.0)]
    assert placed(choose(site, "disk", me="s1")) == "s2"


def test_spread_follows_power_ratings() -> None:
    """30 logins one after another over servers rated 1, 1 and 2 land 7/7/15 or so."""
    powers = {"s1": 1.0, "s2": 1.0, "s3": 2.0}
    counts: Counter[str] = Counter()
    for _ in range(30):
        site = [server(n, power=p, targets=counts[n]) for n, p in powers.items()]
        counts[placed(choose(site, "disk", me="s1"))] += 1
    assert counts["s3"] in {14, 15, 16}
    assert {counts["s1"], counts["s2"]} <= {7, 8}


def test_tie_prefers_the_login_server_then_name() -> None:
    site = [server("s1"), server("s2"), server("s3")]
    assert placed(choose(site, "disk", me="s2")) == "s2"
    assert placed(choose(site, "disk", me="elsewhere")) == "s1"


def test_down_or_stopping_servers_are_skipped() -> None:
    site = [server("s1", serving=False), server("s2", targets=9)]
    assert placed(choose(site, "disk", me="s1")) == "s2"


def test_replica_still_hashing_is_not_a_candidate() -> None:
    site = [server("s1", identity=None), server("s2", targets=5)]
    assert placed(choose(site, "disk", me="s1")) == "s2"
    result = choose([server("s1", identity=None)], "disk", me="s1")
    assert isinstance(result, Refusal) and result.code is ErrorCode.IDENTITY_PENDING


def test_unknown_vdisk() -> None:
    result = choose([server("s1")], "other", me="s1")
    assert isinstance(result, Refusal) and result.code is ErrorCode.UNKNOWN_VDISK


def test_pinned_identity_only_goes_to_identical_replicas() -> None:
    site = [server("s1", identity=A_TOUCHED), server("s2", targets=50, identity=A)]
    assert placed(choose(site, "disk", me="s1", pinned=A)) == "s2"
    result = choose([server("s1", identity=A_TOUCHED)], "disk", me="s1", pinned=A)
    assert isinstance(result, Refusal) and result.code is ErrorCode.NO_IDENTICAL_REPLICA


def test_new_target_gets_highest_version_then_newest_manifest_without_a_vote() -> None:
    assert preferred_identity([A, A_TOUCHED, A]) == A_TOUCHED, "two copies do not outvote one"
    assert preferred_identity([A, A, B_NEWER]) == B_NEWER
    assert preferred_identity([B_OLDER, A_TOUCHED, A_TOUCHED]) == B_OLDER
    assert preferred_identity([A, None]) == A
    assert preferred_identity([None]) is None
    assert preferred_identity([]) is None
    site = [server("s1", identity=A), server("s2", identity=A, targets=1),
            server("s3", identity=A_TOUCHED, targets=5)]
    result = choose(site, "disk", me="s1")
    assert isinstance(result, Placement) and result.identity == A_TOUCHED
    assert result.server == "s3"


def test_count_breaks_only_a_tie_of_version_and_time() -> None:
    same_time = ReplicaIdentity(1, 1_000, 4096, b"z" * 32)
    assert preferred_identity([same_time, A, A]) == A
    assert preferred_identity([same_time, same_time, A]) == same_time
    assert preferred_identity([A, same_time]) == preferred_identity([same_time, A])


def test_damaged_replica_is_never_a_candidate() -> None:
    site = [server("s1", identity=A, damaged=True), server("s2", identity=A, targets=50)]
    assert placed(choose(site, "disk", me="s1")) == "s2"
    assert placed(choose(site, "disk", me="s1", pinned=A)) == "s2"


def test_damaged_newer_version_does_not_become_the_reference() -> None:
    site = [server("s1", identity=B_NEWER, damaged=True), server("s2", identity=A, targets=9)]
    result = choose(site, "disk", me="s1")
    assert isinstance(result, Placement) and result.identity == A and result.server == "s2"


def test_only_damaged_copies_left_is_a_refusal_that_says_so() -> None:
    result = choose([server("s1", identity=A, damaged=True)], "disk", me="s1")
    assert isinstance(result, Refusal) and result.code is ErrorCode.NO_IDENTICAL_REPLICA
    assert "damaged" in result.message
    site = [server("s1", identity=A, damaged=True), server("s2", identity=A_TOUCHED)]
    result = choose(site, "disk", me="s2", pinned=A)
    assert isinstance(result, Refusal) and result.code is ErrorCode.NO_IDENTICAL_REPLICA
    assert "not damaged" in result.message
    checking = [server("s1", identity=A, damaged=True), server("s2", identity=None)]
    result = choose(checking, "disk", me="s1")
    assert isinstance(result, Refusal) and result.code is ErrorCode.IDENTITY_PENDING


def test_damaged_fixed_server_copy_is_not_served() -> None:
    off = {"load_balancing": False, "fixed_server": "s1"}
    site = [server("s1", damaged=True, **off), server("s2", **off)]
    result = choose(site, "disk", me="s2")
    assert isinstance(result, Refusal) and "damaged" in result.message


def test_load_balancing_off_uses_the_fixed_server_only() -> None:
    off = {"load_balancing": False, "fixed_server": "s2"}
    site = [server("s1", **off), server("s2", targets=99, **off), server("s3", **off)]
    result = choose(site, "disk", me="s1")
    assert isinstance(result, Placement) and result.server == "s2" and not result.failover
    site[1] = server("s2", serving=False, **off)
    result = choose(site, "disk", me="s1")
    assert isinstance(result, Refusal) and "s2" in result.message


def test_subnet_affinity_best_effort_prefers_local_then_any() -> None:
    aff = {"affinity": SubnetAffinity.best_effort}
    site = [server("s1", subnets=(NET1,), targets=5, **aff), server("s2", subnets=(NET2,), **aff)]
    assert placed(choose(site, "disk", me="s1", target_ip="10.1.0.50")) == "s1"
    assert placed(choose(site, "disk", me="s1", target_ip="10.3.0.50")) == "s2"


def test_subnet_affinity_fixed_refuses_without_a_local_server() -> None:
    aff = {"affinity": SubnetAffinity.fixed}
    site = [server("s1", subnets=(NET1,), targets=5, **aff), server("s2", subnets=(NET2,), **aff)]
    assert placed(choose(site, "disk", me="s2", target_ip="10.1.0.50")) == "s1"
    result = choose(site, "disk", me="s1", target_ip="10.9.0.1")
    assert isinstance(result, Refusal) and "subnet" in result.message


def test_subnet_affinity_none_ignores_subnets() -> None:
    site = [server("s1", subnets=(NET1,), targets=5), server("s2", subnets=(NET2,))]
    assert placed(choose(site, "disk", me="s1", target_ip="10.1.0.50")) == "s2"


def test_failover_rules() -> None:
    assert failover_allowed(Replica(A))
    assert not failover_allowed(Replica(A, load_balancing=False, fixed_server="s1"))
    assert not failover_allowed(Replica(A, maintenance=True))
    assert not failover_allowed(Replica(A, mode=Mode.private))
    assert failover_allowed(Replica(A, mode=Mode.private, shared=True))


def test_avoided_server_is_skipped_unless_it_is_the_fixed_one() -> None:
    site = [server("s1"), server("s2", targets=5)]
    assert placed(choose(site, "disk", me="s1", avoid="s1")) == "s2"
    off = {"load_balancing": False, "fixed_server": "s1"}
    assert placed(choose([server("s1", **off)], "disk", me="s2", avoid="s1")) == "s1"
