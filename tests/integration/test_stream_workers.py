"""Stream workers (``stream_workers``): logged-in read-only sessions are served by worker
processes of pvsd, and everything a target and the site see stays as with one process.

Real pvsd processes with their real workers; targets through ``pvs_target``'s client and
``VDiskStream``; every byte compared with the image.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Pvsd, logged_in, make_vdisk, random_bytes, read_whole
from sites import Site, until
from test_failover import _failover_under_reads

from pvs_target.client import ClientError, ServerError

MIB = 1 << 20
WORKERS = ["--stream-workers", "2"]


def worker_pids(server: Pvsd) -> list[int]:
    """The stream workers of ``server``: its child processes."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def wait_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes {pids} still running"
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Pvsd]:
    make_vdisk(tmp_path / "store", "disk", 8 * MIB, seed=5)
    pvsd = Pvsd("w1", tmp_path / "store", tmp_path, args=WORKERS)
    try:
        pvsd.start(vdisks=["disk"])
        pvsd.wait_for_log("stream_worker_started", worker=2)
        yield pvsd
    finally:
        pvsd.stop()


async def test_sessions_are_served_by_the_workers_byte_for_byte(server: Pvsd) -> None:
    expected = random_bytes(8 * MIB, 5)

    async def one(device: str) -> None:
        async with logged_in(server.address, "disk", device) as session:
            assert await read_whole(session) == expected

    async with asyncio.timeout(60):
        await asyncio.gather(*(one(f"t{n}") for n in range(4)))
    handed = server.find_logs("session_handed_over")
    assert len(handed) == 4
    assert {line["worker"] for line in handed} == {1, 2}, "sessions go to the least loaded"
    assert len(worker_pids(server)) == 2
    await until(lambda: len(server.find_logs("target_disconnected")) == 4, 15,
                "pvsd to hear that the worker's sessions ended")
    assert not server.trouble()


async def test_a_write_is_refused_and_the_session_goes_on(server: Pvsd) -> None:
    expected = random_bytes(8 * MIB, 5)
    async with asyncio.timeout(30), logged_in(server.address, "disk", "w") as session:
        await server.until_log("session_handed_over")
        with pytest.raises(ServerError, match="Standard Image"):
            await session.connection.write(0, b"x" * 4096)
        assert await session.connection.read(MIB, MIB) == expected[MIB : 2 * MIB]


async def test_killing_pvsd_ends_the_connections_of_its_workers(server: Pvsd) -> None:
    pids = worker_pids(server)
    async with asyncio.timeout(30), logged_in(server.address, "disk", "k") as session:
        await server.until_log("session_handed_over")
        await session.connection.read(0, 4096)
        server.kill()
        wait_gone(pids)  # they see pvsd's end of the channel close, and exit
        with pytest.raises(ClientError):
            for _ in range(100):
                await session.connection.read(0, 4096)
                await asyncio.sleep(0.05)


async def test_a_dead_worker_is_replaced(server: Pvsd) -> None:
    expected = random_bytes(8 * MIB, 5)
    async with asyncio.timeout(30), logged_in(server.address, "disk", "d") as session:
        line = await server.until_log("session_handed_over")
        victim = worker_pids(server)[line["worker"] - 1]
        os.kill(victim, signal.SIGKILL)  # a child of the pvsd this test started
        with pytest.raises(ClientError):
            for _ in range(100):
                await session.connection.read(0, 4096)
                await asyncio.sleep(0.05)
    await server.until_log("stream_worker_ended", worker=line["worker"])
    await until(lambda: len(server.find_logs("stream_worker_started", worker=line["worker"]))
                == 2, 15, "a new worker")
    async with asyncio.timeout(30), logged_in(server.address, "disk", "d2") as session:
        assert await read_whole(session) == expected


@pytest.mark.parametrize("act", ["stop", "kill", "freeze"])
async def test_failover_from_a_server_with_workers(tmp_path: Path, act: str) -> None:
    """The same failovers as with one process: stop-stream moves the workers' sessions by
    RELOGIN, a killed pvsd takes its workers' connections with it, and a frozen one makes
    them end after peer_timeout."""
    site = Site(tmp_path)
    for member in site.servers:
        member.args += WORKERS
    try:
        site.start()
        await _failover_under_reads(site, act)
    finally:
        site.stop()
