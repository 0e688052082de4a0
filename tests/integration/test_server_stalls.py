"""The server side of issue 11, against real pvsd processes: serving is never starved by
background work, a store that stops answering sends its targets elsewhere (and is served again
when it answers), SITE reaches streaming targets, and a crashed writer's lock passes at once.

The stalled store needs root, loop devices and ext4, and either device-mapper (``dmsetup
suspend``) or nbdkit's pause filter with nbdfuse (a store whose disk is served by a paused
nbdkit hangs exactly like a suspended device); it skips with the reason otherwise. Everything
it sets up is taken down whatever happens (resumed first, then unmounted and detached), and
only processes it started are signalled, by their PID. No wait relies on timing slack: each
is a bounded poll for a log line or a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    Pvsd,
    RawClient,
    Servers,
    logged_in,
    make_vdisk,
    pvs_target,
    random_bytes,
    read_whole,
)
from sites import Site, keygen, private_site

from pvs_protocol import events as ev
from pvs_protocol.errors import ErrorCode
from pvs_target.login import LoginError, login

MIB = 1 << 20


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so that reading it needs the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_reads(pid: int) -> int:
    """Bytes a process (all its threads) and its children (pvsd's stream workers, if any)
    made the storage layer fetch, from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for each in [pid, *(int(child) for child in children)]:
        lines = Path(f"/proc/{each}/io").read_text().splitlines()
        total += next(int(line.split()[1]) for line in lines if line.startswith("read_bytes:"))
    return total


async def next_matching(
    client: RawClient, wanted: Callable[[ev.Event], bool], timeout: float = 15.0
) -> tuple[ev.Event, list[ev.Event]]:
    """The first frame that ``wanted`` accepts, and those before it (bounded in time and
    count)."""
    seen: list[ev.Event] = []
    async with asyncio.timeout(timeout):
        for _ in range(1000):
            event = await client.read_event(timeout)
            if wanted(event):
                return event, seen
            seen.append(event)
    raise AssertionError(f"no such frame among {seen}")


async def streaming_client(address: str, vdisk: str, device: str) -> RawClient:
    """A raw target logged in at exactly this server (REDIRECTED: serve or refuse)."""
    client = await RawClient.connect(address)
    await client.hello()
    await client.send_event(ev.Login(device, vdisk, redirected=True))
    reply = await client.read_event()
    assert isinstance(reply, ev.LoginOk), reply
    client.login_ok = reply
    return client


# -- serving is not starved ------------------------------------------------------------------


async def test_reads_that_miss_the_page_cache_are_served_while_background_work_holds_its_pool(
    pvsd_factory: Servers, tmp_path: Path,
) -> None:
    """One background thread, held by a scrub paced at 4 KiB/s; three new images wait behind
    it to be checked. A target still reads a served image from the disk, whole, while that
    work is still waiting (the logs say so after the read)."""
    store = tmp_path / "store"
    size = 8 * MIB
    make_vdisk(store, "served", size, seed=1)
    server = pvsd_factory(
        "bg", store, vdisks=["served"],
        args=["--background-threads", "1", "--scrub-rate", "4096"],
    )
    server.wait_for_log("scrub_started", vdisk="served")
    for index in range(3):
        (store / f"new{index}.img").write_bytes(random_bytes(4 * MIB, 10 + index))
    for index in range(3):
        server.wait_for_log("vdisk_found", vdisk=f"new{index}")
    evict(store / "served.img")
    before = disk_reads(server.pid)
    async with asyncio.timeout(30), logged_in(server.address, "served") as session:
        data = await read_whole(session, chunk=256 * 1024)
    assert data == random_bytes(size, 1)
    assert disk_reads(server.pid) - before >= size, "the reads were not served from the disk"
    # the background work was still waiting when the read had completed
    assert not server.find_logs("scrub_clean"), "the scrub ended: the pool was not held"
    for index in range(3):
        assert not server.find_logs("identity_published", vdisk=f"new{index}")
    assert not server.trouble()


# -- a stalled store -------------------------------------------------------------------------


class StallableFilesystem:
    """ext4 on a block device whose I/O can be made to hang and go on again."""

    def __init__(self, mountpoint: Path, suspend: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.mountpoint = mountpoint
        self.suspend = suspend
        self.resume = resume


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _need_root_and_loop() -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: this machine (container) has no loop devices")
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("needs mkfs.ext4 and losetup (e2fsprogs, util-linux)")


def _unmount(path: Path) -> None:
    """Unmount, retrying for a bounded time while something still holds it busy."""
    for _ in range(50):
        if _run("umount", str(path)).returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)
    _run("umount", "-l", str(path))


@contextlib.contextmanager
def _device_mapper(workdir: Path) -> Iterator[StallableFilesystem | None]:
    """dm-linear over a loop device: ``dmsetup suspend`` hangs its I/O. None if this kernel
    has no device-mapper."""
    if shutil.which("dmsetup") is None or _run("dmsetup", "targets").returncode != 0:
        yield None
        return
    backing = workdir / "dm.raw"
    with backing.open("wb") as handle:
        handle.truncate(128 * MIB)
    attach = _run("losetup", "-f", "--show", str(backing))
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {attach.stderr.strip()}")
    loop = attach.stdout.strip()
    name = f"pvs-stall-{os.getpid()}"
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    created = mounted = False
    try:
        table = f"0 {128 * MIB // 512} linear {loop} 0"
        created = _run("dmsetup", "create", name, "--table", table).returncode == 0
        if not created:
            pytest.skip("dmsetup create failed: no device-mapper here")
        device = f"/dev/mapper/{name}"
        assert _run("mkfs.ext4", "-q", "-F", device).returncode == 0
        mounted = _run("mount", device, str(mountpoint)).returncode == 0
        assert mounted, "cannot mount the ext4 on the dm device"
        yield StallableFilesystem(
            mountpoint,
            lambda: _check(_run("dmsetup", "suspend", "--nolockfs", name)),
            lambda: _check(_run("dmsetup", "resume", name)),
        )
    finally:
        if created:
            _run("dmsetup", "resume", name)
        if mounted:
            _unmount(mountpoint)
        if created:
            _run("dmsetup", "remove", name)
        _run("losetup", "-d", loop)


def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def _paused_nbd(workdir: Path) -> Iterator[StallableFilesystem]:
    """nbdkit (pause filter) serving a disk file, nbdfuse making it a file again, a loop
    device over that and ext4 on it: pausing nbdkit hangs the store's I/O."""
    tools = ("nbdkit", "nbdfuse")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no device-mapper, and no {', '.join(missing)} to hang a store with")
    backing = workdir / "nbd.raw"
    with backing.open("wb") as handle:
        handle.truncate(128 * MIB)
    assert _run("mkfs.ext4", "-q", "-F", str(backing)).returncode == 0
    socket_path, control = workdir / "nbd.sock", workdir / "pause.sock"
    fuse_dir, mountpoint = workdir / "fuse", workdir / "mnt"
    fuse_dir.mkdir()
    mountpoint.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    loop = ""
    mounted = False

    def command(byte: bytes, answer: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as channel:
            channel.settimeout(30)
            channel.connect(str(control))
            channel.sendall(byte)
            assert channel.recv(1) == answer

    try:
        with (workdir / "nbd.log").open("ab") as log:
            processes.append(subprocess.Popen(
                ["nbdkit", "-f", "-U", str(socket_path), "--filter=pause", "file",
                 str(backing), f"pause-control={control}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            ))
            _until(lambda: socket_path.exists() and control.exists(), "nbdkit to listen")
            processes.append(subprocess.Popen(
                ["nbdfuse", str(fuse_dir / "disk"), "--unix", str(socket_path)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            ))
        _until(lambda: (fuse_dir / "disk").exists(), "nbdfuse to mount")
        attach = _run("losetup", "-f", "--show", "--direct-io=on", str(fuse_dir / "disk"))
        if attach.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {attach.stderr.strip()}")
        loop = attach.stdout.strip()
        mounted = _run("mount", loop, str(mountpoint)).returncode == 0
        assert mounted, "cannot mount the ext4 on the loop device"
        yield StallableFilesystem(
            mountpoint, lambda: command(b"p", b"P"), lambda: command(b"r", b"R")
        )
    finally:
        with contextlib.suppress(OSError, AssertionError):
            command(b"r", b"R")
        if mounted:
            _unmount(mountpoint)
        if loop:
            _run("losetup", "-d", loop)
        if os.path.ismount(fuse_dir):
            _unmount(fuse_dir)
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def stallable_filesystem(workdir: Path) -> Iterator[StallableFilesystem]:
    _need_root_and_loop()
    with _device_mapper(workdir) as filesystem:
        if filesystem is not None:
            yield filesystem
            return
    with _paused_nbd(workdir) as filesystem:
        yield filesystem


def _pair(workdir: Path, first: Path, second: Path, *extra: str) -> list[Pvsd]:
    key = workdir / "site.key"
    key.write_text(keygen())
    servers = [Pvsd("s1", first, workdir), Pvsd("s2", second, workdir)]
    for server in servers:
        other = next(s for s in servers if s is not server)
        server.args = ["--key-file", str(key), "--peer", other.address, "--admin", "off",
                       "--peer-timeout", "2", *extra]
    return servers


def _replicate(source: Path, target: Path, name: str) -> None:
    target.mkdir(parents=True)
    for file in source.glob(f"{name}.*"):
        if not file.name.endswith((".identity.json", ".lock")):
            shutil.copy2(file, target / file.name)


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_stalled_store_sends_its_targets_elsewhere_and_is_served_again(
    tmp_path: Path, workers: int
) -> None:
    """With stream workers, the reader is served by one: the worker finds the store stalled,
    and pvsd withdraws it from the site and asks the target to move, as for its own."""
    size = 8 * MIB
    with stallable_filesystem(tmp_path) as filesystem:
        stalled_store = filesystem.mountpoint / "store1"
        make_vdisk(stalled_store, "disk", size, seed=5)
        data = random_bytes(size, 5)
        _replicate(stalled_store, tmp_path / "store2", "disk")
        s1, s2 = _pair(tmp_path, stalled_store, tmp_path / "store2",
                       "--stream-workers", str(workers))
        suspended = False
        try:
            for server in (s1, s2):
                server.start(vdisks=["disk"])
                if workers:
                    server.wait_for_log("stream_worker_started", worker=workers)
            for server, other in ((s1, s2), (s2, s1)):
                server.wait_for_log("peer_inventory", peer=other.name)
            async with asyncio.timeout(90):
                reader = await streaming_client(s1.address, "disk", "raw-reader")
                evict(stalled_store / "disk.img")
                filesystem.suspend()
                suspended = True
                sent = time.monotonic()
                await reader.send_event(ev.Read(1, 4 * MIB, 64 * 1024))
                # answered with IO_ERROR (no second answer), and asked to move
                answer, before = await next_matching(
                    reader, lambda e: isinstance(e, ev.Error) and e.request_id == 1
                )
                print(f"stalled read answered after {time.monotonic() - sent:.3f} s")
                assert isinstance(answer, ev.Error) and answer.code is ErrorCode.IO_ERROR
                assert "not answering" in answer.message
                if not any(isinstance(e, ev.Relogin) for e in before):
                    await next_matching(reader, lambda e: isinstance(e, ev.Relogin))
                stalled = await s1.until_log("store_stalled", store=str(stalled_store))
                assert stalled["targets_moved"] == 1 and "action" in stalled
                assert stalled["found_by"] == (["worker 1"] if workers else ["pvsd"])
                await s1.until_log("request_stalled", op="read")

                # new logins are refused here, and a target reading the vDisk moves on
                refused = await RawClient.connect(s1.address)
                await refused.hello()
                await refused.send_event(ev.Login("raw-late", "disk", redirected=True))
                refusal = await refused.read_event()
                assert isinstance(refusal, ev.Error), refusal
                assert refusal.code is ErrorCode.NO_IDENTICAL_REPLICA
                await refused.close()
                out = tmp_path / "read.img"
                result = await asyncio.to_thread(
                    pvs_target, "read", "--server", s1.address, "--server", s2.address,
                    "--vdisk", "disk", "-o", str(out), "-q", "--json", timeout=60,
                )
                assert result.returncode == 0, result.stderr
                assert out.read_bytes() == data

                filesystem.resume()
                suspended = False
                await s1.until_log("store_recovered", store=str(stalled_store))
                await s1.until_log("late_result_dropped", request=1)
                # id 1 is free again: its answer is this read's, never the late one's
                await reader.send_event(ev.Read(1, 0, 4096))
                again, _ = await next_matching(
                    reader, lambda e: getattr(e, "request_id", 0) == 1
                )
                assert isinstance(again, ev.ReadData) and bytes(again.data) == data[:4096]
                await reader.close()
                fresh = await streaming_client(s1.address, "disk", "raw-after")
                evict(stalled_store / "disk.img")
                back = await fresh.read(6 * MIB, 64 * 1024)
                assert isinstance(back, ev.ReadData)
                assert bytes(back.data) == data[6 * MIB : 6 * MIB + 64 * 1024]
                await fresh.close()
            assert not s1.trouble() and not s2.trouble()
        finally:
            if suspended:
                filesystem.resume()
            for server in (s1, s2):
                try:
                    server.stop()
                finally:
                    server.kill()


# -- SITE reaches streaming targets ----------------------------------------------------------


async def test_a_streaming_target_learns_of_a_server_started_after_its_login(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path, count=3)
    s1, s2, s3 = site.servers
    try:
        for server in (s1, s2):
            server.start(vdisks=["disk"])
        s1.wait_for_log("peer_inventory", peer=s2.name)
        async with asyncio.timeout(60):
            client = await streaming_client(s1.address, "disk", "raw-site")
            assert client.login_ok is not None and client.login_ok.site == (s2.address,)
            s3.start(vdisks=["disk"])
            added, _ = await next_matching(
                client, lambda e: isinstance(e, ev.SiteUpdate) and s3.address in e.site
            )
            assert isinstance(added, ev.SiteUpdate)
            assert set(added.site) == {s2.address, s3.address}
            assert s1.address not in added.site
            await asyncio.to_thread(s3.stop)
            gone, _ = await next_matching(
                client, lambda e: isinstance(e, ev.SiteUpdate) and s3.address not in e.site
            )
            assert isinstance(gone, ev.SiteUpdate) and gone.site == (s2.address,)
            await client.close()
        assert s1.find_logs("site_sent")
    finally:
        site.stop()


# -- Private Image lock hand-over -------------------------------------------------------------


def private_pair(workdir: Path, peer_timeout: float) -> contextlib.AbstractContextManager[
    tuple[Path, list[Pvsd]]
]:
    """Two servers over one shared store holding Private Image ``priv``, with a peer timeout
    long enough that a take-over before it cannot be the site's verdict."""
    return private_site(workdir, peer_timeout=peer_timeout)


async def test_a_crashed_writers_lock_is_taken_over_before_the_peer_timeout(
    tmp_path: Path,
) -> None:
    with private_pair(tmp_path, peer_timeout=10) as (_shared, (p1, p2)):
        async with asyncio.timeout(60):
            first = await login([p1.address], "priv", "writer-a", connect_timeout=2)
            await first.connection.write(0, b"a" * 4096)
            await first.connection.flush()
            holder = p1 if first.server_name == p1.name else p2
            survivor = p2 if holder is p1 else p1
            holder.kill()
            killed = time.monotonic()
            second = await login([survivor.address], "priv", "writer-b", connect_timeout=5)
            print(f"lock taken over {time.monotonic() - killed:.3f} s after SIGKILL")
            taken = survivor.find_logs("lock_taken_over", vdisk="priv")
            assert taken and "refused a connection" in taken[-1]["reason"], taken
            assert not survivor.find_logs("peer_down"), "the site had declared it down first"
            await second.connection.write(4096, b"b" * 4096)
            await second.connection.flush()
            assert await second.connection.read(0, 4096) == b"a" * 4096
            await second.close()
            await first.connection.close()
            # a restarted pvsd releases nothing of the new writer's, and serves again
            restart(holder)
            assert not holder.find_logs("lock_released_from_previous_run")
        assert not survivor.trouble()


async def test_a_restarted_server_releases_the_locks_of_its_previous_life(
    tmp_path: Path,
) -> None:
    with private_pair(tmp_path, peer_timeout=10) as (shared, (p1, p2)):
        async with asyncio.timeout(60):
            first = await login([p1.address], "priv", "writer-a", connect_timeout=2)
            holder = p1 if first.server_name == p1.name else p2
            holder.kill()
            await first.connection.close()
            assert (shared / "priv.lock").exists()
            restart(holder)
            holder.wait_for_log("lock_released_from_previous_run", vdisk="priv")
            again = await login([holder.address], "priv", "writer-a2", connect_timeout=5)
            await again.close()


def restart(server: Pvsd) -> None:
    """Start a killed server again; its log file goes on, so wait for the second life's
    lines."""
    server.process = None
    server.start()
    server.wait_for_log("listening", count=2)
    server.wait_for_log("identity_published", vdisk="priv", count=2)


async def test_a_frozen_writers_lock_is_kept_until_its_server_is_declared_down(
    tmp_path: Path,
) -> None:
    with private_pair(tmp_path, peer_timeout=2) as (_shared, (p1, p2)):
        async with asyncio.timeout(60):
            first = await login([p1.address], "priv", "writer-a", connect_timeout=2)
            holder = p1 if first.server_name == p1.name else p2
            survivor = p2 if holder is p1 else p1
            holder.freeze()
            try:
                with pytest.raises(LoginError) as refused:
                    await login([survivor.address], "priv", "writer-b", connect_timeout=5)
                assert refused.value.code is ErrorCode.BUSY
                assert not survivor.find_logs("lock_taken_over")
                await survivor.until_log("peer_down", timeout=20, peer=holder.name)
                second = await login([survivor.address], "priv", "writer-b", connect_timeout=5)
                await second.close()
            finally:
                holder.thaw()
            await first.connection.close()
        assert not survivor.find_logs("lock_holder_crashed")
