"""Failover with real servers: stop, kill, freeze, roll; and the cases with no failover.

Three pvsd processes on their own loopback addresses form a site. Targets read through
``VDiskStream`` continuously while servers go away, and every byte they read is compared with
the image: the bar is zero read errors and zero wrong bytes, and the longest wait is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from harness import PYTHON, image_path, manifest_identity
from sites import SIZE, Site, pvsctl, restart, running_site, stop_async, until

from pvs_target.failover import FailoverSettings, GaveUp, VDiskStream

MIB = 1 << 20
FAST = FailoverSettings(keepalive_interval=0.3, dead_after=1.0, connect_timeout=1.0)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(tmp_path) as built:
        yield built


class Reader:
    """Reads the whole vDisk again and again, 1 MiB at a time, 4 in flight, checking bytes."""

    def __init__(self, stream: VDiskStream, expected: bytes) -> None:
        self.stream = stream
        self.expected = expected
        self.errors: list[str] = []
        self.wrong = 0
        self.bytes = 0
        self.passes = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        while not self._stop.is_set():
            for offset in range(0, len(self.expected), MIB):
                queue.put_nowait(offset)
            await asyncio.gather(*(self._worker(queue) for _ in range(4)))
            self.passes += 1

    async def _worker(self, queue: asyncio.Queue[int]) -> None:
        while not queue.empty():
            offset = queue.get_nowait()
            try:
                data = await self.stream.read(offset, MIB)
            except Exception as error:  # the point: there must be none
                self.errors.append(f"{offset}: {error!r}")
                continue
            self.bytes += len(data)
            if data != self.expected[offset : offset + MIB]:
                self.wrong += 1

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def reading(
    site: Site, device: str = "t1", settings: FailoverSettings = FAST,
    servers: list[str] | None = None,
) -> AsyncIterator[Reader]:
    stream = VDiskStream(servers or site.addresses, "disk", device, settings=settings)
    await stream.open()
    reader = Reader(stream, site.data)
    task = asyncio.create_task(reader.run())
    try:
        yield reader
    finally:
        reader.stop()
        async with asyncio.timeout(60):
            await task
        await stream.close()
    assert reader.errors == [], reader.errors[:5]
    assert reader.wrong == 0


async def _failover_under_reads(site: Site, act: str) -> None:
    async with reading(site) as reader:
        await until(lambda: reader.bytes > 4 * MIB, 20, "first reads")
        stream = reader.stream
        first = stream.status()["server"]["name"]
        victim = site.by_name(first)
        read_before = reader.bytes
        if act == "stop":
            stopping = asyncio.create_task(stop_async(victim))
        elif act == "kill":
            victim.kill()
        else:
            victim.freeze()
        await until(lambda: len(stream.history) >= 1, 15, "a failover")
        await until(lambda: reader.bytes > read_before + 2 * SIZE, 30, "reads after failover")
        status = stream.status()
        assert status["server"]["name"] != first
        record = status["failovers"][0]
        assert record["from"]["name"] == first
        print(f"{act}: failover {record}, longest wait {status['longest_wait_ms']} ms")
        if act == "stop":
            assert "relogin" in record["reason"]
            await stopping
    assert reader.passes >= 2


async def test_stop_stream_by_sigterm_moves_the_target(site: Site) -> None:
    await _failover_under_reads(site, "stop")


async def test_killed_server(site: Site) -> None:
    await _failover_under_reads(site, "kill")


async def test_frozen_server(site: Site) -> None:
    await _failover_under_reads(site, "freeze")


async def test_a_planned_move_right_after_a_freeze_does_not_wait_for_the_frozen_server(
    tmp_path: Path,
) -> None:
    """t1 streams from s1 (power 4), t2 from s2. s1 freezes: t1 moves to s3. Before the
    peers notice (their peer timeout is long here), s3 stops its stream service: its RELOGIN
    lists s1 first (its last known load is the lowest) and a login server would still place
    t1 there. t1 must move to s2 at once: not log in at s1 first nor be sent there, which
    would each cost a connect timeout."""
    built = Site(tmp_path, powers=(4, 1, 1))
    for server in built.servers:
        server.args[server.args.index("--peer-timeout") + 1] = "60"
    built.start()
    s1, _, s3 = built.servers
    try:
        async with reading(built, "t1") as first:
            await until(lambda: first.bytes > 2 * MIB, 20, "t1's first reads")
            stream = first.stream
            assert stream.status()["server"]["name"] == "s1"
            async with reading(built, "t2") as second:
                await until(lambda: second.bytes > 2 * MIB, 20, "t2's first reads")
                assert second.stream.status()["server"]["name"] == "s2"
                s1.freeze()
                try:
                    await until(lambda: len(stream.history) >= 1, 15, "t1 leaving s1")
                    assert stream.status()["server"]["name"] == "s3"
                    stopping = asyncio.create_task(stop_async(s3))
                    await until(lambda: len(stream.history) >= 2, 15, "t1 leaving s3")
                    await stopping
                    record = stream.history[1]
                    assert record.to_server == "s2" and "relogin" in record.reason, record
                    # a login attempt at frozen s1 alone takes connect_timeout (1 s)
                    assert record.took_ms < 0.8 * FAST.connect_timeout * 1000, record
                    assert record.longest_wait_ms < 100, record
                finally:
                    s1.thaw()
    finally:
        built.stop()


async def test_targets_of_a_stopped_server_spread_over_the_rest(tmp_path: Path) -> None:
    site = Site(tmp_path)
    streams = []
    try:
        site.servers[0].start(vdisks=["disk"])  # s1 alone takes every target
        for n in range(8):
            stream = VDiskStream([site.servers[0].address], "disk", f"d{n}", settings=FAST)
            await stream.open()
            streams.append(stream)
        assert {s.status()["server"]["name"] for s in streams} == {"s1"}
        for server in site.servers[1:]:
            server.start(vdisks=["disk"])
            site.servers[0].wait_for_log("peer_inventory", peer=server.name)
        await stop_async(site.servers[0])
        await until(lambda: all(s.history for s in streams), 15, "every target to move")
        landed = Counter(s.status()["server"]["name"] for s in streams)
        assert set(landed) == {"s2", "s3"} and min(landed.values()) >= 2, landed
        for stream in streams:
            assert await stream.read(SIZE - MIB, MIB) == site.data[-MIB:]
            assert stream.longest_wait_ms < 1000, "a planned move must not make reads wait"
    finally:
        for stream in streams:
            await stream.close()
        site.stop()


async def test_rolling_stop_start_under_many_readers(site: Site) -> None:
    async with contextlib.AsyncExitStack() as stack:
        readers = [
            await stack.enter_async_context(reading(site, f"roll{n}")) for n in range(6)
        ]
        await until(lambda: all(r.bytes > MIB for r in readers), 20, "reads")
        for server in site.servers:
            await stop_async(server)
            await asyncio.sleep(0.5)
            restart(server)
            for other in site.servers:
                if other is not server:
                    await other.until_log("peer_up", peer=server.name, timeout=10) if (
                        other.find_logs("peer_down", peer=server.name)
                    ) else None
            await asyncio.sleep(1.0)
        longest = max(r.stream.longest_wait_ms for r in readers)
        moves = sum(len(r.stream.history) for r in readers)
        print(f"rolling restart: {moves} failovers, longest read wait {longest} ms")
        assert moves >= len(readers)


@pytest.mark.parametrize(
    ("properties", "why"),
    [
        ({"load_balancing": "off", "fixed_server": "s1"}, "load balancing off"),
        ({"mode": "private"}, "Private Image"),
        ({"maintenance": "on", "maintenance_devices": "fixed"}, "maintenance"),
    ],
)
async def test_no_failover_waits_for_its_server(
    tmp_path: Path, properties: dict[str, str], why: str
) -> None:
    site = Site(tmp_path, **properties)
    try:
        site.start()
        stream = VDiskStream([site.servers[0].address], "disk", "fixed", settings=FAST)
        await stream.open()
        try:
            home = stream.status()["server"]["name"]
            assert not stream.failover_allowed
            server = site.by_name(home)
            server.kill()
            pending = asyncio.create_task(stream.read(0, MIB))
            await until(lambda: stream.state == "waiting" and stream.waiting_reason, 10, "wait")
            status = stream.status()
            assert home in status["waiting_reason"]
            assert status["no_failover_reason"]
            await asyncio.sleep(1.0)
            assert not pending.done(), "the read must wait for its server, not go elsewhere"
            restart(server)
            async with asyncio.timeout(20):
                assert await pending == site.data[:MIB]
            assert stream.status()["server"]["name"] == home
            assert stream.history[-1].to_server == home
        finally:
            await stream.close()
    finally:
        site.stop()



@pytest.mark.parametrize("other", ["damaged", "new version"])
async def test_no_identical_replica_means_waiting_never_other_bytes(
    site: Site, other: str
) -> None:
    """A pinned target whose server dies while the only other up server holds a copy that is
    not identical (damaged, or another version: even the newer one, the site's reference)
    waits, and reads nothing, until a server with an identical copy comes back."""
    s1 = site.servers[0]
    stream = VDiskStream([s1.address], "disk", "pinned", settings=FAST)
    await stream.open()
    try:
        home = site.by_name(stream.status()["server"]["name"])
        others = [s for s in site.servers if s is not home]
        # one other replica changes content; the other server stops
        store = others[0].stores[0]
        changed = image_path(store, "disk")
        with changed.open("r+b") as handle:
            handle.write(b"\xff" * 4096)
        if other == "damaged":  # no new manifest: its server finds the copy damaged
            others[0].wait_for_log("replica_damaged", vdisk="disk", first_bad_offset=0)
        else:  # the admin made the changed bytes version 2 on that server
            pvsctl("vdisk", "manifest", "disk", "--store", str(store), "--version", "2")
            new = manifest_identity(store, "disk")
            assert new.version == 2
            others[0].wait_for_log("identity_published", vdisk="disk", identity=new.short)
        others[1].stop()
        home.kill()
        pending = asyncio.create_task(stream.read(0, MIB))
        await asyncio.sleep(3.0)
        assert not pending.done(), "read went to a different replica or failed"
        assert "identical" in stream.status()["waiting_reason"]
        restart(others[1])
        async with asyncio.timeout(20):
            assert await pending == site.data[:MIB]
        assert stream.status()["server"]["name"] == others[1].name
    finally:
        await stream.close()


async def test_give_up_after_fails_reads_clearly(site: Site) -> None:
    settings = FailoverSettings(
        keepalive_interval=0.3, dead_after=1.0, connect_timeout=0.5, give_up_after=1.5
    )
    stream = VDiskStream(site.addresses, "disk", "quitter", settings=settings)
    await stream.open()
    try:
        for server in site.servers:
            server.kill()
        with pytest.raises(GaveUp, match="disk: no server could stream it for"):
            async with asyncio.timeout(20):
                await stream.read(0, MIB)
        with pytest.raises(GaveUp):  # at once from then on: no second wait, no new error
            async with asyncio.timeout(0.5):
                await stream.read(0, MIB)
        for server in site.servers:
            restart(server)
        async with asyncio.timeout(20):  # the stream resumes by itself
            while stream.status()["state"] != "streaming":
                await asyncio.sleep(0.05)
        assert await stream.read(0, MIB) == site.data[:MIB]
    finally:
        await stream.close()


async def test_attach_status_shows_the_server_change(site: Site, tmp_path: Path) -> None:
    control = tmp_path / "target.sock"
    attach = subprocess.Popen(
        [PYTHON, "-m", "pvs_target", "attach", "--server", site.servers[0].address,
         "--vdisk", "disk", "--device-id", "attached", "--control", str(control)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert attach.stdout is not None
        ready = json.loads(attach.stdout.readline())
        assert ready["event"] == "attached"
        before = _status(control)
        assert before["server"]["address"] == ready["address"]
        assert before["identity"]["digest"]
        first = site.by_name(before["server"]["name"])
        assert before["server"]["address"] == first.address
        pvsctl("--admin", f"{first.host}:{first.port + 1}", "--key-file", str(site.key),
                "stop-stream", first.name)
        deadline = time.monotonic() + 15
        while (after := _status(control))["server"]["name"] == first.name:
            assert time.monotonic() < deadline, "status never showed another server"
            time.sleep(0.1)
        assert after["server"]["address"] != first.address
        assert after["failovers"][0]["from"]["address"] == first.address
        text = subprocess.run(
            [PYTHON, "-m", "pvs_target", "status", "--control", str(control)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        assert after["server"]["address"] in text
    finally:
        attach.send_signal(signal.SIGTERM)
        try:
            attach.wait(15)
        except subprocess.TimeoutExpired:
            attach.kill()
            attach.wait()
        if attach.stdout is not None:
            attach.stdout.close()


def _status(control: Path) -> dict[str, object]:
    out = subprocess.run(
        [PYTHON, "-m", "pvs_target", "status", "--control", str(control), "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]
