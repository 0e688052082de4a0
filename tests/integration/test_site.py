"""A site of real servers: least-busy login by power, damaged replicas, peers down, forged
coordination datagrams, load balancing off."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from pathlib import Path

from harness import image_path
from sites import Site, pvsctl, running_site

from pvs_protocol import coordination as co
from pvs_target.login import Session, login


async def _login_many(addresses: list[str], count: int, prefix: str) -> list[Session]:
    """Log ``count`` targets in at once, spread over the given login servers."""
    return list(
        await asyncio.gather(
            *(
                login([addresses[n % len(addresses)]], "disk", f"{prefix}{n}", connect_timeout=5)
                for n in range(count)
            )
        )
    )


async def test_logins_spread_by_power_rating(tmp_path: Path) -> None:
    with running_site(tmp_path, powers=(1.0, 1.0, 2.0)) as site:
        sessions = await _login_many(site.addresses, 30, "t")
        try:
            landed = Counter(s.server_name for s in sessions)
            print(f"30 targets over powers 1/1/2: {dict(landed)}")
            assert 12 <= landed["s3"] <= 18, landed
            assert 5 <= landed["s1"] <= 10 and 5 <= landed["s2"] <= 10, landed
            assert sum(s.redirected for s in sessions) > 0, "nobody was redirected"
        finally:
            await asyncio.gather(*(s.close() for s in sessions))


async def test_modified_replica_is_damaged_and_never_served(tmp_path: Path) -> None:
    with running_site(tmp_path) as site:
        s1, s2, s3 = site.servers
        first = await login([s1.address], "disk", "pinned-early")
        pinned = first.identity
        await first.close()
        with image_path(s3.stores[0], "disk").open("r+b") as handle:
            handle.seek(4096)
            handle.write(b"changed")
        started = time.monotonic()
        s3.wait_for_log("replica_damaged", vdisk="disk", first_bad_offset=0, timeout=10)
        for other in (s1, s2):  # the damage reached the peers: bounded time
            other.wait_for_log("peer_inventory", peer="s3", generation=lambda g: g >= 2)
        print(f"modified replica left the identical set in {time.monotonic() - started:.2f} s")
        for n in range(12):  # neither pinned nor new targets ever land on s3 again
            session = await login([s3.address], "disk", f"p{n}", pinned=pinned)
            assert session.server_name != "s3"
            assert session.identity == pinned
            await session.close()
            fresh = await login([s3.address], "disk", f"n{n}")
            assert fresh.server_name != "s3" and fresh.identity == pinned
            await fresh.close()
        admin = ["--admin", f"{s3.host}:{s3.port + 1}", "--key-file", str(site.key)]
        assert "DAMAGED" in pvsctl(*admin, "vdisks")
        (disk,) = json.loads(pvsctl(*admin, "vdisks", "--json"))["vdisks"]
        damaged = next(r for r in disk["replicas"] if r["server"] == "s3")
        assert damaged["status"] == "damaged" and damaged["damage"]["first_offset"] == 0
        assert disk["reference"]["digest"] == pinned.digest.hex()


async def test_killed_peer_is_marked_down_and_gets_no_logins(tmp_path: Path) -> None:
    with running_site(tmp_path) as site:
        s1, s2, s3 = site.servers
        s3.kill()
        for survivor in (s1, s2):  # both login servers must know before they place anyone
            survivor.wait_for_log("peer_down", peer="s3", timeout=10)
        sessions = await _login_many([s1.address, s2.address], 10, "k")
        try:
            assert {s.server_name for s in sessions} <= {"s1", "s2"}
        finally:
            await asyncio.gather(*(s.close() for s in sessions))


def test_forged_and_replayed_datagrams_are_dropped(tmp_path: Path) -> None:
    with running_site(tmp_path, count=2) as site:
        s1, _ = site.servers
        key = bytes.fromhex(site.key.read_text().strip())
        beat = co.Heartbeat(
            "intruder", "127.0.0.99:1", "", co.ServerState.SERVING, 1000.0, 0, 0, 1, 1,
        )
        now = int(time.time() * 1000)
        good = co.encode(co.Envelope(1, 1, now, beat), key)
        forged = co.encode(co.Envelope(1, 2, now, beat), b"x" * 32)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            target = (s1.host, s1.port)
            sock.sendto(forged, target)
            sock.sendto(good, target)
            sock.sendto(good, target)  # the same datagram again: a replay
            sock.sendto(b"\x00" * 7, target)
        s1.wait_for_log("site_message_dropped", reason="unauthenticated")
        s1.wait_for_log("site_message_dropped", reason="replayed")
        s1.wait_for_log("site_message_dropped", reason="malformed")
        assert s1.alive()


async def test_load_balancing_off_sends_every_target_to_the_named_server(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path, load_balancing="off", fixed_server="s2")
    try:
        site.start()
        sessions = await _login_many(site.addresses, 9, "f")
        try:
            assert {s.server_name for s in sessions} == {"s2"}
            assert all(not s.flags & s.flags.FAILOVER for s in sessions)
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
    finally:
        site.stop()


def test_settings_survive_restart_and_match_everywhere(tmp_path: Path) -> None:
    with running_site(tmp_path) as site:
        admin = ["--admin", f"{site.servers[0].host}:{site.servers[0].port + 1}",
                 "--key-file", str(site.key)]
        pvsctl(*admin, "vdisk", "set", "disk", "--subnet-affinity", "best_effort")
        for server in site.servers:
            text = (server.stores[0] / "disk.vdisk.toml").read_text()
            assert 'subnet_affinity = "best_effort"' in text, server.name
