"""Mount a vDisk: ``pvs-target attach --nbd`` against a real site, driven by real NBD clients.

Every test runs the real ``python -m pvs_target attach`` as a subprocess against real pvsd
processes on loopback (the site helpers of tests/integration), and reads and writes the export
with nbdinfo, nbdcopy, qemu-img, qemu-io, fio, nbdfuse, debugfs and, where the machine allows,
a loop mount. Standard Image: writes land in the target's write cache, never on the servers,
and survive failovers; a full cache is ENOSPC. Private Image (shared store): writes reach the
image file, and a second writer is refused. Each test skips cleanly when a tool is missing.

Only processes started here are signalled, always by their own PID, and every one is ended in
a ``finally``; every wait is bounded in time and in count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import PYTHON, image_path, make_vdisk, random_bytes
from nbd_tools import end, need, run
from sites import Site, keygen, private_site, pvsctl

pytestmark = pytest.mark.external

MIB = 1 << 20
BIG = 128 * MIB
"""The vDisk copied while its server goes away: large enough to be mid-copy for sure."""
MODULE_SIZE = 64 * MIB
BLOCK_SIZE = 512
"""The block size of the module's vDisk: not the default (4096), so the export must pass on
what the vDisk says rather than a constant."""
ATTACH_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PVSD_CONFIG = "inventory_interval = 0.5\n"
"""For every pvsd here: a server that starts after its peers learns their replicas within
half a second rather than the default five, so that a site is ready sooner."""


def attempt(*command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command whose failure the test looks at."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def sha256(data: bytes | Path) -> str:
    if isinstance(data, Path):
        digest = hashlib.sha256()
        with data.open("rb") as file:
            for block in iter(lambda: file.read(4 * MIB), b""):
                digest.update(block)
        return digest.hexdigest()
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- sites ----------------------------------------------------------------------------------


class DiskSite(Site):
    """`Site` (three servers, identical replicas of vDisk ``disk`` by cp -p), but with a
    vDisk of any size, or the bytes of ``source``, and optionally another block size."""

    def __init__(
        self, workdir: Path, *, size: int = 16 * MIB, seed: int = 7,
        source: Path | None = None, block_size: int | None = None, count: int = 3,
    ) -> None:
        self.workdir = workdir
        self.key = workdir / "site.key"
        self.key.write_text(keygen())
        first = workdir / "store1"
        if source is None:
            make_vdisk(first, "disk", size, seed=seed)
            self.data = random_bytes(size, seed)
        else:
            first.mkdir(parents=True)
            pvsctl("vdisk", "import", str(source), "--name", "disk", "--store", str(first),
                   "--format", "raw")
            self.data = source.read_bytes()
        if block_size is not None:  # the properties file is meant to be edited by hand too
            properties = first / "disk.vdisk.toml"
            text = properties.read_text()
            assert "block_size = 4096\n" in text, text
            properties.write_text(text.replace("block_size = 4096\n",
                                               f"block_size = {block_size}\n"))
        config = workdir / "pvsd.toml"
        config.write_text(PVSD_CONFIG)
        self._replicate_and_join(count, lambda _: ["--config", str(config)])


@contextlib.contextmanager
def started(site: Site) -> Iterator[Site]:
    try:
        site.start()
        yield site
    finally:
        site.stop()


def image_digests(site: Site) -> set[str]:
    return {sha256(image_path(server.stores[0], "disk")) for server in site.servers}


# -- the attached target ------------------------------------------------------------------


@dataclasses.dataclass
class Attached:
    process: subprocess.Popen[str]
    control: Path
    socket: Path
    log: Path
    ready: dict[str, Any]
    vdisk: str

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.vdisk}?socket={self.socket}"

    def status(self) -> dict[str, Any]:
        result = run(PYTHON, "-m", "pvs_target", "status", "--control", str(self.control),
                     "--json", timeout=30)
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def log_tail(self, count: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "--- pvs-target attach stderr ---\n" + "\n".join(lines[-count:])


def attach_command(servers: list[str], vdisk: str, control: Path, *extra: str) -> list[str]:
    command = [PYTHON, "-m", "pvs_target", "-v", "attach", "--vdisk", vdisk,
               "--control", str(control), *extra]
    for server in servers:
        command += ["--server", server]
    return command


@contextlib.contextmanager
def attached(
    servers: list[str], *extra: str, vdisk: str = "disk", device: str = "nbd-target"
) -> Iterator[Attached]:
    """``pvs-target attach --nbd unix:...`` until its ``attached`` line; SIGTERM (then, if
    it must, SIGKILL) by its PID on the way out, where it must exit 0."""
    workdir = Path(tempfile.mkdtemp(prefix="pvs-attach-", dir="/tmp"))  # short socket paths
    control, nbd, log = workdir / "control.sock", workdir / "nbd.sock", workdir / "attach.log"
    command = attach_command(servers, vdisk, control, "--device-id", device,
                             "--nbd", f"unix:{nbd}", *extra)
    process: subprocess.Popen[str] | None = None
    try:
        with log.open("w") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=log_file, text=True)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], ATTACH_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        target = Attached(process, control, nbd, log, {}, vdisk)
        assert line, f"attach printed nothing (exit {process.poll()})\n{target.log_tail()}"
        target.ready = json.loads(line)
        assert target.ready["event"] == "attached", line
        assert target.ready["nbd"] == f"unix:{nbd}"
        yield target
        end(process)  # the test went well: so must the detach
        assert process.returncode == 0, \
            f"attach exited {process.returncode} on SIGTERM\n{target.log_tail()}"
    finally:
        if process is not None:
            end(process)
            if process.stdout is not None:
                process.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)



def streams_from_another_than(target: Attached, name: str) -> Callable[[], bool]:
    def check() -> bool:
        server = target.status()["server"]
        return server is not None and server["name"] != name

    return check


def nbdcopy_to_file(uri: str, destination: Path) -> float:
    """Copy the whole export; return MB/s."""
    began = time.monotonic()
    run("nbdcopy", uri, str(destination), timeout=120)
    seconds = time.monotonic() - began
    return destination.stat().st_size / seconds / 1e6


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    arguments = [part for command in commands for part in ("-c", command)]
    result = attempt("qemu-io", "-f", "raw", *arguments, uri, timeout=60)
    if check:
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Pattern verification failed" not in output, output
        assert "error" not in output.lower(), output
    return result


# -- a Standard Image shared by the read-only tests ----------------------------------------


@pytest.fixture(scope="module")
def standard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site serving a 64 MiB Standard Image vDisk of block size 512."""
    site = DiskSite(tmp_path_factory.mktemp("standard"), size=MODULE_SIZE, seed=11,
                    block_size=BLOCK_SIZE)
    with started(site):
        yield site


@pytest.fixture(scope="module")
def standard_target(standard: Site) -> Iterator[Attached]:
    with attached(standard.addresses, "--cache", "ram", device="reader") as target:
        yield target


def test_nbdinfo_shows_a_writable_export_of_the_vdisk(standard_target: Attached) -> None:
    need("nbdinfo")
    info = json.loads(run("nbdinfo", "--json", standard_target.uri).stdout)
    assert info["protocol"] == "newstyle-fixed"
    [export] = info["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == MODULE_SIZE
    assert export["is_read_only"] is False, "Standard Image with a write cache is writable"
    assert export["block_size_preferred"] == BLOCK_SIZE
    assert export["block_size_minimum"] <= BLOCK_SIZE <= export["block_size_maximum"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, (flag, export)
    assert export.get("description") == "pvs vDisk disk"
    status = standard_target.status()
    assert status["mode"] == "standard" and status["read_only"] is True


def test_nbdcopy_of_the_whole_export_matches_the_image(
    standard: Site, standard_target: Attached, tmp_path: Path
) -> None:
    need("nbdcopy")
    copy = tmp_path / "copy.raw"
    speed = nbdcopy_to_file(standard_target.uri, copy)
    assert sha256(copy) == sha256(standard.data)
    assert image_digests(standard) == {sha256(standard.data)}
    print(f"nbdcopy through the export: {speed:.0f} MB/s ({MODULE_SIZE // MIB} MiB)")


def test_qemu_img_compare_with_the_image_file(standard: Site,
                                              standard_target: Attached) -> None:
    need("qemu-img")
    image = image_path(standard.servers[0].stores[0], "disk")
    result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image),
                 standard_target.uri)
    assert "Images are identical" in result.stdout


def test_full_write_cache_is_enospc_and_keeps_what_was_written(
    standard: Site, tmp_path: Path
) -> None:
    need("qemu-io", "nbdcopy")
    with attached(standard.addresses, "--cache", "ram", "--cache-size", "1M",
                  device="small-cache") as target:
        qemu_io(target.uri, "write -P 0x11 8M 1M")  # 256 pages of 4 KiB: exactly the limit
        full = qemu_io(target.uri, "write -P 0x22 10M 64k", "read -P 0x11 8M 1M", check=False)
        output = full.stdout + full.stderr
        assert "No space left on device" in output, output
        assert "Pattern verification failed" not in output
        assert "read 1048576/1048576 bytes" in output, output

        source = tmp_path / "more.raw"
        source.write_bytes(random.Random(5).randbytes(2 * MIB))
        copy = attempt("nbdcopy", str(source), target.uri, timeout=60)
        assert copy.returncode != 0, "nbdcopy wrote 2 MiB into a full 1 MiB cache"
        assert "No space left" in copy.stderr, copy.stderr

        qemu_io(target.uri, "read -P 0x11 8M 1M")
        merged = tmp_path / "merged.raw"
        nbdcopy_to_file(target.uri, merged)
        expected = bytearray(standard.data)
        expected[8 * MIB : 9 * MIB] = b"\x11" * MIB
        assert merged.read_bytes() == expected, "a refused write changed the disk"
        assert target.process.poll() is None, target.log_tail()
        assert "write_cache_full" in target.log.read_text()
    assert image_digests(standard) == {sha256(standard.data)}


# -- Standard Image writes through failovers ------------------------------------------------


def test_writes_stay_in_the_cache_and_survive_failovers(tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy", "fio")
    with started(DiskSite(tmp_path, size=16 * MIB)) as site, attached(
        site.addresses, "--cache", "ram+overflow", "--cache-ram", "1M", device="writer"
    ) as target:
        size = len(site.data)
        before = image_digests(site)
        assert before == {sha256(site.data)}
        commands = ["write -P 0xab 4096 1M", "write -P 0xcd 3000000 70000",
                    "write -z 8M 64k", "discard 9M 8k", "write -P 0xef 15M 1M"]
        checks = ["read -P 0xab 4096 1M", "read -P 0xcd 3000000 70000", "read -P 0 8M 64k",
                  "read -P 0 9M 8k", "read -P 0xef 15M 1M"]
        qemu_io(target.uri, *commands, *checks, "flush")
        fio = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={target.uri}",
               "--rw=write", "--bs=4k", "--iodepth=8", "--offset=10M", "--size=4M",
               "--verify=crc32c", "--verify_state_save=0", "--output-format=json"]
        report = run(*fio, "--do_verify=1", timeout=120).stdout
        assert json.loads(report[report.index("{"):])["jobs"][0]["error"] == 0

        expected = bytearray(site.data)
        expected[4096 : 4096 + MIB] = b"\xab" * MIB
        expected[3000000:3070000] = b"\xcd" * 70000
        expected[8 * MIB : 8 * MIB + 65536] = bytes(65536)
        expected[9 * MIB : 9 * MIB + 8192] = bytes(8192)
        expected[15 * MIB : 16 * MIB] = b"\xef" * MIB
        copy = tmp_path / "merged.raw"
        nbdcopy_to_file(target.uri, copy)
        merged = copy.read_bytes()
        assert len(merged) == size
        fio_region = slice(10 * MIB, 14 * MIB)
        assert merged[fio_region] != site.data[fio_region], "fio wrote nothing"
        expected[fio_region] = merged[fio_region]  # fio's blocks, verified by fio itself
        assert merged == expected
        assert image_digests(site) == before, "a Standard Image was written on a server"

        moves = []
        for act in ("stop", "kill"):  # a planned move, then a crash
            first = target.status()["server"]["name"]
            victim = site.by_name(first)
            if act == "stop":
                victim.signal(signal.SIGTERM)
            else:
                victim.kill()
            qemu_io(target.uri, *checks)  # waits through the failover
            verified = run(*fio, "--verify_only", timeout=120).stdout
            job = json.loads(verified[verified.index("{"):])["jobs"][0]
            assert job["error"] == 0 and job["read"]["io_bytes"] == 4 * MIB, job
            nbdcopy_to_file(target.uri, copy)
            assert copy.read_bytes() == merged, f"the written data changed after {act}"
            wait_until(streams_from_another_than(target, first),
                       f"status to show a server other than {first}")
            if act == "stop":
                assert victim.wait(STOP_TIMEOUT) == 0
            moves.append(first)
        status = target.status()
        assert [record["from"]["name"] for record in status["failovers"]] == moves
        assert status["server"]["name"] not in moves
        assert image_digests(site) == before
        print(f"write cache through 2 failovers: longest wait {status['longest_wait_ms']} ms, "
              f"failovers {[(r['reason'], r['took_ms']) for r in status['failovers']]}")


# -- whole-disk copy while the streaming server goes away ------------------------------------


@pytest.mark.parametrize("act", ["stop", "kill"])
def test_nbdcopy_through_a_failover_mid_copy(tmp_path: Path, act: str) -> None:
    need("nbdcopy")
    site = DiskSite(tmp_path, size=BIG, seed=23)
    expected = sha256(site.data)
    with started(site), attached(site.addresses, "--cache", "ram", device=f"copy-{act}") as target:
        victim = site.by_name(target.ready["server"])
        errors = tmp_path / "nbdcopy.err"
        with errors.open("w") as error_file:
            copy = subprocess.Popen(["nbdcopy", target.uri, "-"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=error_file)
        try:
            digest, copied, acted_at, seconds = _drain(copy, act_at=BIG // 4, act=lambda: (
                victim.signal(signal.SIGTERM) if act == "stop" else victim.kill()))
            assert copy.wait(STOP_TIMEOUT) == 0, errors.read_text()
        finally:
            end(copy)
            if copy.stdout is not None:
                copy.stdout.close()
        assert acted_at < BIG, "the server went away only after the copy"
        assert copied == BIG
        assert digest == expected, f"the copy differs from the image ({act} mid-copy)"
        if act == "stop":
            assert victim.wait(STOP_TIMEOUT) == 0
        status = target.status()
        assert status["server"]["name"] != victim.name, status
        assert status["failovers"][0]["from"]["name"] == victim.name
        print(f"{act} mid-copy: {BIG / seconds / 1e6:.0f} MB/s over the whole copy, "
              f"longest wait {status['longest_wait_ms']} ms, failover "
              f"{status['failovers'][0]['reason']!r} took {status['failovers'][0]['took_ms']} ms")


def _drain(
    process: subprocess.Popen[bytes], *, act_at: int, act: Callable[[], object],
    timeout: float = 90.0,
) -> tuple[str, int, int, float]:
    """Hash what ``process`` writes to its stdout; call ``act`` once ``act_at`` bytes have
    come (the copy cannot end before: the rest is not read yet). Returns (sha256, bytes, where
    it acted, seconds)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    digest = hashlib.sha256()
    copied, acted_at = 0, -1
    began = time.monotonic()
    deadline = began + timeout
    for _ in range(BIG):  # each round reads at least one byte or ends
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"nbdcopy wrote nothing more after {copied} bytes"
        chunk = os.read(fd, MIB)
        if not chunk:
            break
        digest.update(chunk)
        copied += len(chunk)
        if acted_at < 0 and copied >= act_at:
            acted_at = copied
            act()
    return digest.hexdigest(), copied, acted_at, time.monotonic() - began


# -- Private Image on a shared store ---------------------------------------------------------



def test_private_image_writes_reach_the_image_on_flush(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    with private_site(tmp_path, size=8 * MIB, config=PVSD_CONFIG) as (shared, servers), attached(
        [s.address for s in servers], vdisk="priv", device="writer-a"
    ) as target:
        original = random_bytes(8 * MIB, 3)
        info = json.loads(run("nbdinfo", "--json", target.uri).stdout)
        [export] = info["exports"]
        assert export["is_read_only"] is False and export["export-size"] == 8 * MIB
        status = target.status()
        assert status["mode"] == "private" and status["read_only"] is False
        qemu_io(target.uri, "write -P 0x5a 1M 64k", "flush")
        on_disk = image_path(shared, "priv").read_bytes()
        assert on_disk[MIB : MIB + 65536] == b"\x5a" * 65536, "FLUSH returned before the data"
        assert on_disk[: MIB] == original[:MIB] and on_disk[MIB + 65536 :] == original[
            MIB + 65536 :]
        qemu_io(target.uri, "write -f -P 0x6b 2M 4k", "write -z 3M 64k",
                "read -P 0x5a 1M 64k", "read -P 0x6b 2M 4k", "read -P 0 3M 64k", "flush")
        on_disk = image_path(shared, "priv").read_bytes()
        assert on_disk[2 * MIB : 2 * MIB + 4096] == b"\x6b" * 4096, "FUA write not on disk"
        assert on_disk[3 * MIB : 3 * MIB + 65536] == bytes(65536)
        assert on_disk[4 * MIB :] == original[4 * MIB :]


def test_private_image_writer_fails_over_with_its_writes(tmp_path: Path) -> None:
    need("qemu-io")
    with private_site(tmp_path, size=8 * MIB, config=PVSD_CONFIG) as (shared, servers), attached(
        [s.address for s in servers], vdisk="priv", device="writer-a"
    ) as target:
        qemu_io(target.uri, "write -P 0x5a 1M 64k", "flush")
        home = next(s for s in servers if s.name == target.status()["server"]["name"])
        survivor = next(s for s in servers if s is not home)
        # the site sees the written image (a new identity) before the server goes away
        survivor.wait_for_log("identity_published", count=2, vdisk="priv", timeout=15)
        home.kill()
        try:
            after = attempt("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k",
                            "-c", "write -P 0x6c 2M 4k", "-c", "flush", target.uri,
                            timeout=12)
        except subprocess.TimeoutExpired:  # run() has killed qemu-io by its PID
            status = target.status()
            raise AssertionError(
                f"I/O still waits 12 s after {home.name} was killed: {status['state']}: "
                f"{status['waiting_reason']}") from None
        assert after.returncode == 0, after.stdout + after.stderr
        assert "Pattern verification failed" not in after.stdout
        on_disk = image_path(shared, "priv").read_bytes()
        assert on_disk[2 * MIB : 2 * MIB + 4096] == b"\x6c" * 4096
        status = target.status()
        assert status["server"]["name"] == survivor.name
        assert status["failovers"][0]["from"]["name"] == home.name


def test_second_attach_of_a_private_image_is_refused(tmp_path: Path) -> None:
    with private_site(tmp_path, size=8 * MIB, config=PVSD_CONFIG) as (_, servers), attached(
        [s.address for s in servers], vdisk="priv", device="writer-a"
    ):
        control = Path(tempfile.mkdtemp(prefix="pvs-second-", dir="/tmp"))
        command = attach_command([s.address for s in servers], "priv", control / "c.sock",
                                 "--device-id", "writer-b", "--nbd",
                                 f"unix:{control / 'nbd.sock'}")
        try:
            second = subprocess.run(command, capture_output=True, text=True, timeout=6,
                                    stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as hung:  # run() has killed it by its PID
            raise AssertionError(f"the second attach still runs after 6 s:\n"
                                 f"{(hung.stderr or b'')[-2000:]!r}") from None
        finally:
            shutil.rmtree(control, ignore_errors=True)
        assert second.returncode == 2, second
        assert "attached" not in second.stdout
        assert "writer-a" in second.stderr, second.stderr
        assert "pvs-target: error:" in second.stderr


# -- a filesystem in a vDisk ----------------------------------------------------------------

FILES = {
    "hello.txt": b"Mounted through pvs-target attach --nbd.\n",
    "deep/dir/blob.bin": random.Random(99).randbytes(3 * MIB + 123),
}


@pytest.fixture(scope="module")
def ext4_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attached]:
    """A 64 MiB ext4 image made with ``mkfs.ext4 -d``, imported, replicated, attached."""
    need("mkfs.ext4", "debugfs")
    workdir = tmp_path_factory.mktemp("ext4")
    source = workdir / "src"
    for name, content in FILES.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    image = workdir / "fs.img"
    with image.open("wb") as file:
        file.truncate(64 * MIB)
    run("mkfs.ext4", "-q", "-F", "-d", str(source), str(image))
    (workdir / "site").mkdir()
    site = DiskSite(workdir / "site", source=image)
    with started(site), attached(site.addresses, device="fs-reader") as target:
        yield target


def debugfs_cat(device: Path, name: str) -> bytes:
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(device)],
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@contextlib.contextmanager
def fuse_mounted(uri: str) -> Iterator[Path]:
    """The export as the file ``nbd`` in a FUSE mount (nbdfuse, read-only)."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        pytest.skip("mounting FUSE needs root or fusermount3")
    unmount = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    mountpoint = Path(tempfile.mkdtemp(prefix="pvs-fuse-", dir="/tmp"))
    fuse = subprocess.Popen(["nbdfuse", "-r", str(mountpoint), "--uri", uri],
                            stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: (mountpoint / "nbd").exists() or fuse.poll() is not None,
                   "nbdfuse to mount")
        assert fuse.poll() is None, f"nbdfuse exited with {fuse.returncode}"
        yield mountpoint / "nbd"
    finally:
        subprocess.run([*unmount, str(mountpoint)], check=False, timeout=30,
                       capture_output=True)
        end(fuse)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


@pytest.mark.parametrize("via", ["nbdfuse", "nbdcopy"])
def test_read_a_file_out_of_an_ext4_vdisk(ext4_target: Attached, tmp_path: Path,
                                          via: str) -> None:
    if via == "nbdfuse" and shutil.which("nbdfuse") is None:
        via = "nbdcopy"  # the fallback: the whole export into a file
    if via == "nbdcopy":
        need("nbdcopy")
        device = tmp_path / "fs.img"
        nbdcopy_to_file(ext4_target.uri, device)
        for name, content in FILES.items():
            assert debugfs_cat(device, name) == content, name
        return
    with fuse_mounted(ext4_target.uri) as device:
        assert device.stat().st_size == 64 * MIB
        for name, content in FILES.items():
            assert debugfs_cat(device, name) == content, name


def test_loop_mount_of_an_ext4_vdisk(ext4_target: Attached) -> None:
    need("nbdfuse", "mount", "umount")
    with fuse_mounted(ext4_target.uri) as device:
        mountpoint = Path(tempfile.mkdtemp(prefix="pvs-loop-", dir="/tmp"))
        try:
            mount = attempt("mount", "-o", "loop,ro", str(device), str(mountpoint), timeout=30)
            if mount.returncode != 0:
                pytest.skip(f"this machine does not allow a loop mount: {mount.stderr.strip()}")
            try:
                for name, content in FILES.items():
                    assert (mountpoint / name).read_bytes() == content, name
            finally:
                run("umount", str(mountpoint), timeout=30)
        finally:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
