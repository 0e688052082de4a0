"""Corruption below the file system: no stat field changes, yet no wrong byte gets out.

What an administrator saw (issue 10): a server's store on ext4 over a loop device, bytes
flipped in the loop's backing file. The image's size, mtime and ctime stay as they were, so
nothing that looks at the file from above notices; only the content is wrong. Here the server
streaming the vDisk (s1) has its store on such a file system and the other (s2) a plain
directory; the test flips bytes under s1's copy, evicts the image from s1's page cache so that
s1 really reads them, and reads the whole vDisk through ``pvs-target attach --nbd`` with real
NBD clients (nbdcopy, ``qemu-img compare``). The target must check every block against the
pinned manifest, hand out only good bytes, drop s1, fail over to s2, and tell s1 (DAMAGED), which
re-reads the block and marks its copy damaged.

Needs root, loop devices, mkfs.ext4, filefrag, nbdcopy and qemu-img; skips with the reason
otherwise. Everything started or attached here is undone in ``finally`` (targets and servers
stopped by their PID, the file system unmounted, the loop device detached), and every wait is
bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import PYTHON, Pvsd, make_vdisk, random_bytes
from nbd_tools import need, run
from sites import Site, keygen
from test_attach_nbd import PVSD_CONFIG, Attached, attached, attempt

pytestmark = pytest.mark.external

MIB = 1 << 20
SIZE = 32 * MIB
"""The vDisk: large enough that nbdcopy reads it in many parallel requests."""
BACKING_SIZE = 160 * MIB
"""The ext4 file system holding s1's store (the image, its manifest, pvsd's records)."""
FS_BLOCK = 4096
MANIFEST_BLOCK = 16384
"""The digest block size the vDisk is made with (pvsctl's default), for the offsets expected."""
FLIPS = (5 * MIB + 1000, SIZE - 300)
"""Where 16 bytes are flipped below the file system: inside two different manifest blocks,
the second in the last one, so that s1's pass over the whole copy must count two."""
FLIP_LENGTH = 16
WAIT = 30.0
"""Bound of every wait for the servers or the target (a loaded 2-core machine is slow)."""


# -- the file system on a loop device ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoopFilesystem:
    backing: Path
    device: str
    mountpoint: Path


def need_loop_devices() -> None:
    if sys.platform != "linux":
        pytest.skip("loop devices are a Linux thing")
    if os.geteuid() != 0:
        pytest.skip("attaching a loop device and mounting ext4 need root")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: this machine (container) has no loop devices")
    need("losetup", "mkfs.ext4", "mount", "umount", "filefrag", "nbdcopy", "qemu-img")


@contextlib.contextmanager
def ext4_on_loop(workdir: Path) -> Iterator[LoopFilesystem]:
    """A fresh ext4 in a backing file, attached with ``losetup --find --show`` and mounted;
    unmounted and detached on the way out, whatever happened."""
    backing = workdir / "ext4.backing"
    with backing.open("wb") as file:
        file.truncate(BACKING_SIZE)
    # Inode tables and journal written now, not by a kernel thread while the test runs.
    run("mkfs.ext4", "-q", "-F", "-b", str(FS_BLOCK),
        "-E", "lazy_itable_init=0,lazy_journal_init=0", str(backing))
    attach = attempt("losetup", "--find", "--show", str(backing), timeout=30)
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    try:
        mount = attempt("mount", "-t", "ext4", device, str(mountpoint), timeout=30)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount ext4 from {device} here: {mount.stderr.strip()}")
        try:
            yield LoopFilesystem(backing, device, mountpoint)
        finally:
            _unmount(mountpoint)
    finally:
        run("losetup", "-d", device, timeout=30)


def _unmount(mountpoint: Path) -> None:
    """umount; a file system still busy (a process of ours not yet reaped by the kernel) is
    tried again for a bounded time, then detached lazily so the loop device can go."""
    deadline = time.monotonic() + 10
    for _ in range(200):
        result = attempt("umount", str(mountpoint), timeout=30)
        if result.returncode == 0 or not os.path.ismount(mountpoint):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    run("umount", "-l", str(mountpoint), timeout=30)


def physical_offset(path: Path, offset: int) -> int:
    """Where byte ``offset`` of the file ``path`` lies on its file system's device (that is, in
    the loop's backing file), from the extents ``filefrag -v`` reports (synced first)."""
    output = run("filefrag", "-s", "-v", str(path), timeout=30).stdout
    unit = re.search(r"blocks of (\d+) bytes", output)
    assert unit is not None, output
    size = int(unit[1])
    extent = re.compile(r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*(\d+):\s*\d+:(.*)$")
    block = offset // size
    for line in output.splitlines():
        match = extent.match(line)
        if match is None:
            continue
        first, last, physical = int(match[1]), int(match[2]), int(match[3])
        if first <= block <= last:
            flags = match[5]
            assert "unwritten" not in flags and "delalloc" not in flags, line
            return (physical + block - first) * size + offset % size
    raise AssertionError(f"no extent of {path} holds offset {offset}:\n{output}")


def flip_below(backing: Path, at: int, expected: bytes) -> None:
    """XOR bytes of the backing file itself, after checking they are the image's bytes: the
    file system above is neither asked nor told."""
    fd = os.open(backing, os.O_RDWR)
    try:
        found = os.pread(fd, len(expected), at)
        assert found == expected, f"offset {at} of {backing} does not hold the image's bytes"
        os.pwrite(fd, bytes(byte ^ 0xA5 for byte in found), at)
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: Path, device: str) -> None:
    """Drop the image's pages from the page cache (and the loop device's buffers), so that
    the next read by pvsd goes down to the device and sees the flipped bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if shutil.which("blockdev"):
        attempt("blockdev", "--flushbufs", device, timeout=30)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(length)


# -- the site -----------------------------------------------------------------------------------


class BelowSite(Site):
    """Two servers with the same vDisk ``disk`` (image, manifest, properties, cp -p): s1's
    store is ``store1`` (on the loop file system), s2's a plain directory. s1 has no scrub, so
    that only a target can find what is flipped under it."""

    def __init__(self, workdir: Path, store1: Path) -> None:
        self.workdir = workdir
        self.key = workdir / "site.key"
        self.key.write_text(keygen())
        made = workdir / "made"
        make_vdisk(made, "disk", SIZE, seed=41)
        self.data = random_bytes(SIZE, 41)
        store2 = workdir / "store2"
        for store in (store1, store2):
            store.mkdir(exist_ok=True)
            for suffix in (".img", ".manifest", ".vdisk.toml"):
                copied = Path(shutil.copy2(made / f"disk{suffix}", store / f"disk{suffix}"))
                with copied.open("rb") as file:  # on the device before its blocks are looked up
                    os.fsync(file.fileno())
        config = workdir / "pvsd.toml"
        config.write_text(PVSD_CONFIG)
        self.servers = [Pvsd("s1", store1, workdir), Pvsd("s2", store2, workdir)]
        for server, other in zip(self.servers, reversed(self.servers), strict=True):
            server.args = [
                "--config", str(config), "--key-file", str(self.key), "--peer", other.address,
                "--peer-timeout", "2", "--drain-timeout", "5",
                "--admin", f"{server.host}:{server.port + 1}",
            ]
        self.servers[0].args += ["--scrub-rate", "0"]

    def admin(self, server: Pvsd, *args: str) -> Any:
        result = run(PYTHON, "-m", "pvsd.ctl", "--admin", f"{server.host}:{server.port + 1}",
                     "--key-file", str(self.key), "--json", *args, timeout=30)
        return json.loads(result.stdout)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def replica_of(site: BelowSite, asked: Pvsd, server: str) -> dict[str, Any]:
    answer = site.admin(asked, "vdisks")
    (disk,) = (vdisk for vdisk in answer["vdisks"] if vdisk["name"] == "disk")
    replica: dict[str, Any] = next(r for r in disk["replicas"] if r["server"] == server)
    return replica


def shows_damaged(site: BelowSite, asked: Pvsd, server: str) -> bool:
    status: str = replica_of(site, asked, server)["status"]
    return status == "damaged"


# -- the test -------------------------------------------------------------------------------------


def test_bytes_flipped_below_ext4_never_reach_an_nbd_client(tmp_path: Path) -> None:
    need_loop_devices()
    original = tmp_path / "original.raw"
    copy = tmp_path / "copy.raw"
    began = time.monotonic()
    with ext4_on_loop(tmp_path) as filesystem:
        site = BelowSite(tmp_path, filesystem.mountpoint / "store")
        s1, s2 = site.servers
        original.write_bytes(site.data)
        image = filesystem.mountpoint / "store" / "disk.img"
        try:
            site.start()
            with attached([s1.address, s2.address], "--cache", "ram",
                          device="below-fs") as target:
                check_streams_from(target, "s1")
                before = os.stat(image)
                for flip in FLIPS:
                    at = physical_offset(image, flip)
                    flip_below(filesystem.backing, at, site.data[flip : flip + FLIP_LENGTH])
                evict(image, filesystem.device)
                for flip in FLIPS:  # what s1 reads now: the flipped bytes
                    seen = read_at(image, flip, FLIP_LENGTH)
                    assert seen != site.data[flip : flip + FLIP_LENGTH], \
                        f"the page cache still holds the good bytes at {flip}"
                after = os.stat(image)
                for field in ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino"):
                    assert getattr(after, field) == getattr(before, field), field
                assert s1.alive() and not s1.find_logs("replica_damaged"), s1.log_tail()

                run("nbdcopy", target.uri, str(copy), timeout=120)  # exit 0: checked by run
                assert copy.stat().st_size == SIZE
                assert copy.read_bytes() == site.data, "a wrong byte reached nbdcopy"
                compared = run("qemu-img", "compare", "-f", "raw", "-F", "raw",
                               str(original), target.uri, timeout=120)
                assert "Images are identical" in compared.stdout, compared.stdout

                check_target_moved(target, s1)
                check_damage_found(site, target, s1, s2)
            assert s1.alive() and s2.alive()
        finally:
            site.stop()
    print(f"corruption below ext4: found by the target, failed over to s2; test took "
          f"{time.monotonic() - began:.1f} s")


def check_streams_from(target: Attached, name: str) -> None:
    """The corruption must be under the server the target reads from, or it proves nothing."""
    status = target.status()
    assert status["server"] is not None and status["server"]["name"] == name, (
        f"the target streams from {status['server']}, not {name}: log in at {name} with equal "
        f"load should keep it there\n{target.log_tail()}"
    )
    verification = status["verification"]
    assert verification["enabled"] is True and verification["block_size"] == MANIFEST_BLOCK
    assert verification["mismatches"] == [] and verification["dropped_servers"] == []


def check_target_moved(target: Attached, s1: Pvsd) -> None:
    bad_offsets = {flip - flip % MANIFEST_BLOCK for flip in FLIPS}
    status = target.status()
    verification = status["verification"]
    assert verification["mismatches"], f"no mismatch seen\n{target.log_tail()}"
    for mismatch in verification["mismatches"]:
        assert mismatch["server"] == "s1" and mismatch["address"] == s1.address, mismatch
        assert mismatch["offset"] in bad_offsets, (mismatch, bad_offsets)
        assert mismatch["block"] == mismatch["offset"] // MANIFEST_BLOCK, mismatch
    assert verification["dropped_servers"] == [{"name": "s1", "address": s1.address}]
    assert status["server"] is not None and status["server"]["name"] == "s2", status["server"]
    assert status["failovers"], status
    assert status["failovers"][0]["from"]["name"] == "s1", status["failovers"]
    assert "block_mismatch" in target.log.read_text()


def check_damage_found(site: BelowSite, target: Attached, s1: Pvsd, s2: Pvsd) -> None:
    """s1 confirms the target's report by reading the block, then counts every bad block."""
    first = min(flip - flip % MANIFEST_BLOCK for flip in FLIPS)
    try:
        found = s1.wait_for_log("replica_damaged", timeout=WAIT, vdisk="disk",
                                found_by="target")
    except AssertionError as missing:
        reported = s1.find_logs("damage_reported", vdisk="disk")
        raise AssertionError(
            f"the target dropped s1 but s1 never marked its copy damaged; s1 logged "
            f"damage_reported {len(reported)} times, and its sessions ended so: "
            f"{[line.get('reason') for line in s1.find_logs('target_disconnected')]}\n"
            f"{missing}\n{target.log_tail(60)}"
        ) from None
    assert found["first_bad_offset"] in {flip - flip % MANIFEST_BLOCK for flip in FLIPS}, found
    whole = s1.wait_for_log("replica_damaged", timeout=WAIT, vdisk="disk", complete=True)
    assert whole["found_by"] == "target", whole
    assert whole["first_bad_offset"] == first and whole["bad_blocks"] == len(FLIPS), whole
    assert not s2.find_logs("replica_damaged"), s2.log_tail()
    for asked in (s1, s2):  # the damage reached the whole site
        wait_until(functools.partial(shows_damaged, site, asked, "s1"),
                   f"{asked.name}'s admin API to show s1's copy as damaged")
    replica = replica_of(site, s1, "s1")
    assert replica["damage"]["found_by"] == "target", replica
    assert replica["damage"]["first_offset"] == first, replica
    assert replica_of(site, s1, "s2")["status"] != "damaged"
    for server in (s1, s2):
        assert not server.trouble(), f"{server.name} logged trouble: {server.trouble()}"
