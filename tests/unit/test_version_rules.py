"""Versions without I/O: which version each kind of device gets, pending, states on the wire,
and the properties that hold them."""

from __future__ import annotations

import tomllib

import pytest

from pvs_protocol import coordination as co
from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode, VersionState
from pvsd.balance import Placement, Refusal, Replica, ServerView, choose, versions_of
from pvsd.balance import wanted_identity as wanted
from pvsd.properties import PropertiesError, VDiskProperties, dump_properties
from pvsd.versions import DeviceClass, device_class, image_file, key_of, parse_key

V1 = ReplicaIdentity(1, 1_000, 4096, b"1" * 32)
V2 = ReplicaIdentity(2, 2_000, 4096, b"2" * 32)
V2_AGAIN = ReplicaIdentity(2, 2_500, 4096, b"3" * 32)
"""Version 2 made a second time: another version, never the same one."""
V3 = ReplicaIdentity(3, 3_000, 4096, b"4" * 32)
P, T, M = VersionState.production, VersionState.test, VersionState.maintenance


def server(
    name: str, *copies: tuple[ReplicaIdentity | None, VersionState] | tuple[int, VersionState],
    serving: bool = True, targets: int = 0, damaged: frozenset[int] = frozenset(),
    **settings: object,
) -> ServerView:
    versions: dict[int, Replica] = {}
    for identity, state in copies:
        if isinstance(identity, int):  # a copy still being checked: number only
            number, known = identity, None
        else:
            assert identity is not None
            number, known = identity.version, identity
        versions[number] = Replica(
            known, version=number, state=state, damaged=number in damaged,
            mode=Mode.private if state is M else Mode.standard,
            **settings,  # type: ignore[arg-type]
        )
    return ServerView(name, f"{name}:6910", serving, 1.0, targets, (), {"disk": versions})


def test_a_production_version_is_pending_until_every_serving_holder_has_it() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P))]
    assert wanted(site, "disk") == V1
    [v2, v1] = versions_of(site, "disk")
    assert v2.pending and v2.lacking == ("s2",) and v2.holders == ("s1",)
    assert not v1.pending
    site[1] = server("s2", (V1, P), (V2, P))
    assert wanted(site, "disk") == V2


def test_a_server_that_is_down_does_not_hold_a_version_back() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P), serving=False)]
    assert wanted(site, "disk") == V2


def test_a_copy_still_being_checked_does_not_hold_a_version_back() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P), (2, P))]
    assert wanted(site, "disk") == V2


def test_a_damaged_copy_holds_a_version_back() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P), (V2, P), damaged=frozenset({2}))]
    assert wanted(site, "disk") == V1


def test_the_same_change_made_twice_is_not_the_same_version() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P), (V2_AGAIN, P))]
    [v2, _v1] = versions_of(site, "disk")
    assert v2.identity == V2_AGAIN and v2.lacking == ("s1",)
    assert wanted(site, "disk") == V1


def test_with_nothing_held_everywhere_the_newest_production_version_is_served() -> None:
    site = [server("s1", (V2, P)), server("s2", (V1, P))]
    assert wanted(site, "disk") == V2


@pytest.mark.parametrize(
    ("device", "expected"),
    [(DeviceClass.ordinary, V1), (DeviceClass.test, V2), (DeviceClass.maintenance, V3)],
)
def test_each_device_class_gets_its_state(device: DeviceClass, expected: ReplicaIdentity) -> None:
    site = [server("s1", (V1, P), (V2, T), (V3, M)), server("s2", (V1, P), (V2, T))]
    assert wanted(site, "disk", device) == expected


def test_test_and_maintenance_devices_fall_back_to_what_others_get() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P))]
    assert wanted(site, "disk", DeviceClass.test) == V1
    assert wanted(site, "disk", DeviceClass.maintenance) == V1


def test_the_least_released_state_wins_when_servers_disagree() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P), (V2, T))]
    assert versions_of(site, "disk")[0].state is T
    assert wanted(site, "disk") == V1


def test_placement_sends_a_test_device_where_the_test_version_is() -> None:
    site = [server("s1", (V1, P), (V2, T), targets=5), server("s2", (V1, P))]
    test = choose(site, "disk", me="s2", device=DeviceClass.test)
    ordinary = choose(site, "disk", me="s1")
    assert isinstance(test, Placement) and test.server == "s1" and test.identity == V2
    assert isinstance(ordinary, Placement) and ordinary.server == "s2"
    assert ordinary.identity == V1


def test_a_maintenance_version_has_no_failover() -> None:
    site = [server("s1", (V1, P), (V2, M))]
    placed = choose(site, "disk", me="s1", device=DeviceClass.maintenance)
    assert isinstance(placed, Placement) and placed.identity == V2 and not placed.failover


def test_a_pinned_target_keeps_its_version() -> None:
    site = [server("s1", (V1, P), (V2, P)), server("s2", (V1, P), (V2, P))]
    placed = choose(site, "disk", me="s1", pinned=V1)
    assert isinstance(placed, Placement) and placed.identity == V1


def test_a_vdisk_in_maintenance_goes_to_maintenance_devices_only() -> None:
    site = [server("s1", (V1, P), maintenance=True)]
    refused = choose(site, "disk", me="s1")
    assert isinstance(refused, Refusal) and refused.code is ErrorCode.NO_IDENTICAL_REPLICA
    assert "maintenance" in refused.message
    placed = choose(site, "disk", me="s1", device=DeviceClass.maintenance)
    assert isinstance(placed, Placement)


def test_no_version_for_ordinary_devices_is_a_clear_refusal() -> None:
    site = [server("s1", (V1, M))]
    refused = choose(site, "disk", me="s1")
    assert isinstance(refused, Refusal) and "promote" in refused.message


def test_device_classes_come_from_globs_maintenance_first() -> None:
    lists = {"test": ("lab-*",), "maintenance": ("lab-admin",)}
    assert device_class("lab-3", **lists) is DeviceClass.test
    assert device_class("lab-admin", **lists) is DeviceClass.maintenance
    assert device_class("office-1", **lists) is DeviceClass.ordinary
    assert DeviceClass.ordinary.may_get(P) and not DeviceClass.ordinary.may_get(T)
    assert DeviceClass.test.may_get(T) and not DeviceClass.test.may_get(M)


def test_version_file_names_cannot_be_vdisk_names() -> None:
    assert image_file("win10.v2", 3) == "win10.v2@3.img"
    assert parse_key(key_of("win10.v2", 3)) == ("win10.v2", 3)
    assert parse_key("win10") == ("win10", None)


def test_versions_round_trip_through_the_properties_file() -> None:
    properties = VDiskProperties(
        test_devices=("lab-*",), maintenance_devices=("admin",), versions={2: T, 3: M}
    )
    again = VDiskProperties.from_mapping(tomllib.loads(dump_properties(properties)))
    assert again == properties and again.state_of(1) is P and again.state_of(3) is M


@pytest.mark.parametrize(
    "text",
    ['[versions]\n"2" = "beta"\n', '[versions]\n"two" = "test"\n', "versions = 3\n",
     'test_devices = "lab"\n', "test_devices = [1]\n"],
)
def test_bad_version_properties_are_refused(text: str) -> None:
    with pytest.raises(PropertiesError):
        VDiskProperties.from_mapping(tomllib.loads(text))


def test_entries_carry_version_and_state() -> None:
    entry = co.ReplicaEntry("disk", Mode.standard.code, False, True, 0, "", False, V2,
                            version=2, state=T.code)
    chunk = co.chunk_inventory("s1", 1, [entry])[0]
    envelope = co.Envelope(1, 1, 0, chunk)
    decoded = co.decode(co.encode(envelope, b"k" * 32), b"k" * 32).message
    assert isinstance(decoded, co.InventoryChunk) and decoded.entries == (entry,)
    assert decoded.entries[0].key == ("disk", 2)
