"""Automatic rebalancing on a real site: three pvsd processes rated 1, 1 and 2, thirty targets
(``VDiskStream`` objects in this event loop), one server's stream service stopped and started
again. Every wait polls a condition with a bound; none sleeps a guessed time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sites import Site, pvsctl, until

from pvs_target.failover import FailoverSettings, VDiskStream
from pvsd.config import read_key
from pvsd.console import UserError
from pvsd.console.client import AdminClient

INTERVAL = 1.0
"""Rebalancing interval of these servers: small, so that ten intervals pass quickly."""
HEARTBEAT = 0.25
SETTINGS = FailoverSettings(keepalive_interval=0.3, dead_after=2.0, connect_timeout=2.0)
SHARES = {"s1": 7.5, "s2": 7.5, "s3": 15.0}
"""30 targets over powers 1, 1 and 2."""


def fast_site(
    workdir: Path, *, powers: tuple[float, ...], rebalance: bool = True, **properties: str
) -> Site:
    site = Site(workdir, count=len(powers), powers=powers, **properties)
    for server in site.servers:
        server.args += [
            "--rebalance", "on" if rebalance else "off",
            "--rebalance-interval", str(INTERVAL), "--boot-window", "1",
            "--heartbeat-interval", str(HEARTBEAT),
        ]
    return site


@asynccontextmanager
async def targets(site: Site, count: int) -> AsyncIterator[list[VDiskStream]]:
    streams = [
        VDiskStream(site.addresses, "disk", f"pc{n:02d}", settings=SETTINGS) for n in range(count)
    ]
    try:
        await asyncio.gather(*(s.open() for s in streams))
        yield streams
    finally:
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)


def where(streams: list[VDiskStream]) -> dict[str, str]:
    """device -> server now streaming it ('' while it has no session)."""
    return {s.device_id: s.session.server_name if s.session else "" for s in streams}


def spread(streams: list[VDiskStream]) -> Counter[str]:
    return Counter(where(streams).values())


def admin(site: Site) -> AdminClient:
    server = site.servers[1]
    return AdminClient(f"{server.host}:{server.port + 1}", read_key(site.key))


async def api(site: Site, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    client = admin(site)
    if method == "GET":
        return await asyncio.to_thread(client.get, path)
    return await asyncio.to_thread(client.post, path, body or {})


async def ctl(site: Site, *args: str) -> str:
    server = site.servers[1]
    return await asyncio.to_thread(
        pvsctl, *args, "--admin", f"{server.host}:{server.port + 1}", "--key-file", str(site.key)
    )


def within_share(counts: Counter[str]) -> bool:
    return all(abs(counts[name] - share) <= 0.10 * share for name, share in SHARES.items())


async def counters(site: Site) -> dict[str, tuple[int, int]]:
    """server -> (decisions made, targets moved)."""
    answer = await api(site, "GET", "/v1/rebalance")
    assert not answer["errors"], answer["errors"]
    return {s["server"]: (s["runs"], s["moved"]) for s in answer["servers"]}


async def idle(site: Site) -> None:
    """Until no server is carrying out a round (bounded)."""
    deadline = time.monotonic() + 15
    while any(s["busy"] for s in (await api(site, "GET", "/v1/rebalance"))["servers"]):
        assert time.monotonic() < deadline, "a rebalancing round that does not end"
        await asyncio.sleep(HEARTBEAT)


async def test_a_server_back_gets_its_share_in_one_round_then_nothing_moves(
    tmp_path: Path,
) -> None:
    site = fast_site(tmp_path, powers=(1.0, 1.0, 2.0))
    try:
        site.start()
        async with targets(site, 30) as streams:
            print(f"30 targets logged in: {dict(spread(streams))}")
            await ctl(site, "stop-stream", "s1")
            await until(lambda: "s1" not in spread(streams) and "" not in spread(streams),
                         15, "every target of s1 to move away")
            emptied = spread(streams)
            print(f"s1 stopped: {dict(emptied)}")
            started = time.monotonic()
            await ctl(site, "start-stream", "s1")
            # s2 and s3 decide as soon as they see s1 serving again (and the view settles):
            # one interval after it is back, every server is within 10% of its share.
            await until(lambda: within_share(spread(streams)), 10 * INTERVAL,
                         "every server within 10% of its power share")
            balanced = where(streams)
            print(f"s1 back: {dict(spread(streams))} after {time.monotonic() - started:.1f} s")
            moves = [m for s in site.servers for m in s.find_logs("rebalance_move")]
            # s1 coming back, or the interval if it came first, started one round on each
            print("moves by trigger:", Counter((m["from"], m["trigger"]) for m in moves))
            assert {m["to"] for m in moves} == {"s1"}
            assert len(moves) == spread(streams)["s1"]
            plans = [p for s in site.servers for p in s.find_logs("rebalance_plan")
                     if p["moves"]]
            assert len(plans) <= 2 and len({p["server"] for p in plans}) == len(plans), plans

            # Ten more intervals on every server: nothing moves.
            before = await counters(site)
            async def ten_more() -> bool:
                now = await counters(site)
                return all(now[name][0] >= before[name][0] + 10 for name in before)
            deadline = time.monotonic() + 10 * INTERVAL * 4
            while not await ten_more():
                assert time.monotonic() < deadline, "ten rebalancing decisions on every server"
                await asyncio.sleep(INTERVAL / 2)
            after = await counters(site)
            assert {n: c[1] for n, c in after.items()} == {n: c[1] for n, c in before.items()}
            assert where(streams) == balanced
            assert [m for s in site.servers for m in s.find_logs("rebalance_move")] == moves
            status = json.loads(await ctl(site, "rebalance", "--status", "--json"))
            assert {s["server"] for s in status["servers"]} == {"s1", "s2", "s3"}
            assert all(s["last"]["moves"] == [] for s in status["servers"])
            assert sum(len(s["recent_moves"]) for s in status["servers"]) == len(moves)
        for server in site.servers:
            assert not server.trouble(), server.trouble()
    finally:
        site.stop()


async def test_pvsctl_rebalance_dry_run_then_run_with_subnet_affinity(tmp_path: Path) -> None:
    """Automatic rebalancing off, so nothing moves until pvsctl rebalance says so; the vDisk
    has best-effort subnet affinity and s3 is on another subnet than the targets (127.0.0.1):
    targets move only between s1 and s2, and none moves twice."""
    site = fast_site(tmp_path, powers=(1.0, 1.0, 2.0), rebalance=False,
                     subnet_affinity="best_effort")
    for server, subnet in zip(site.servers, ("127.0.0.0/8", "127.0.0.0/8", "10.99.0.0/24"),
                              strict=True):
        server.args += ["--subnet", subnet]
    try:
        site.start()
        async with targets(site, 12) as streams:
            assert spread(streams) == {"s1": 6, "s2": 6}
            await ctl(site, "stop-stream", "s1")
            await until(lambda: spread(streams) == {"s2": 12}, 15, "every target on s2")
            await ctl(site, "start-stream", "s1")

            async def plans() -> dict[str, Any]:
                answer = await api(site, "POST", "/v1/rebalance", {"dry_run": True})
                return {s["server"]: s for s in answer["servers"]}
            deadline = time.monotonic() + 10
            while len((planned := await plans())["s2"]["moves"]) != 6:  # once s2 sees s1 back
                assert time.monotonic() < deadline, planned
                await asyncio.sleep(HEARTBEAT)
            assert planned["s2"]["dry_run"] is True
            assert {m["to"] for m in planned["s2"]["moves"]} == {"s1"}  # never s3: off subnet
            assert planned["s2"]["expected"] == {"s1": 6, "s2": 6, "s3": 0}

            shown = await ctl(site, "rebalance", "--dry-run")
            print(shown)
            assert "Planned moves" in shown and "dry run: nothing moved" in shown, shown
            assert spread(streams) == {"s2": 12}
            assert not site.servers[1].find_logs("rebalance_move")

            done = await ctl(site, "rebalance")
            assert "telling these 6 targets to log in again elsewhere" in done, done
            await until(lambda: spread(streams) == {"s1": 6, "s2": 6}, 10, "6 targets on s1")
            for _ in range(3):  # more rounds: nothing moves, so no target moves twice
                await idle(site)
                again = json.loads(await ctl(site, "rebalance", "--json"))
                assert all(not s["moves"] for s in again["servers"]), again
            moved = [m for s in site.servers for m in s.find_logs("rebalance_move")]
            assert len(moved) == 6 and all(m["from"] == "s2" and m["to"] == "s1" for m in moved)
            assert len({m["target"] for m in moved}) == 6
            assert spread(streams) == {"s1": 6, "s2": 6}

            client = admin(site)
            for body, message in (
                (b'{"dry_run": "yes"}', "dry_run must be true or false"),
                (b'{"dryrun": true}', "unknown field(s) dryrun"),
                (b"[1]", "must be a JSON object"),
            ):
                try:
                    await asyncio.to_thread(client.request, "POST", "/v1/rebalance", body)
                except UserError as error:  # the client's: HTTP 400 and why
                    assert "HTTP 400" in str(error) and message in str(error), error
                else:
                    raise AssertionError(f"{body!r} was accepted")
        for server in site.servers:
            assert not server.trouble(), server.trouble()
    finally:
        site.stop()
