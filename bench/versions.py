"""vDisk versions as full images or as a base plus deltas: space, time to make, read cost.

    .venv/bin/python bench/versions.py [--size 512M] [--versions 4] [--change 2] [--runs 5]
                                       [--seconds 2] [--out bench/results]

Issue 12 asked for the choice to be made by measuring. One base image (random bytes, some
holes) becomes version 1; each later version changes ``--change`` percent of its 16 KiB blocks
(the manifest's block) at random offsets. The same versions are kept two ways, side by side in
one temporary directory on the filesystem of ``--workdir`` (default: the one of /tmp):

- full images ``bench.vN.img``, each copied from the one before with ``os.copy_file_range``
  over the data ranges ``SEEK_DATA``/``SEEK_HOLE`` find (the copy reflinks where the filesystem
  can, and stays in the kernel elsewhere), then changed with ``pwrite``;
- qcow2 overlays ``bench.vN.qcow2`` (``qemu-img create -b``, changed with ``qemu-io``) on top of
  ``bench.v1.img``; once with qcow2's default 64 KiB clusters, once with 16 KiB clusters (space
  only).

The heads are checked identical with ``qemu-img compare``. Then the head of each is served on a
unix socket and read by the same clients: ``nbdcopy`` to ``null:`` and fio's nbd engine (4 KiB
random reads, one in flight), with the files' page cache dropped (``fsync`` then
``posix_fadvise(DONTNEED)`` on just these files) and warm. The full image is served by nbdkit's
file plugin (one pread per request from one file, the shape of pvsd's read path) and by
qemu-nbd (the same server as the chain, so that the format's cost shows apart from the
server's). Last, two versions are read whole and ``fincore`` says how much of the files sits in
the page cache.

Every server is started per measurement and ended by its own pid; every loop is bounded by a
count and every child by a timeout. The JSON goes to ``--out`` as ``versions-DATE-HASH.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pvs_target.units import parse_size

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30
BLOCK = 16384  # the manifest's default block: what a changed "block" is
HOLE_SHARE = 0.08  # of the base's MiB chunks left as holes
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdkit", "nbdcopy", "fio", "fincore")

FULL_NBDKIT, FULL_QEMU, CHAIN = "full image, nbdkit file", "full image, qemu-nbd", "qcow2 chain"
PARTIES = (FULL_NBDKIT, FULL_QEMU, CHAIN)

# FIEMAP (linux/fiemap.h): which extents of a file the filesystem says are shared (reflinked)
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
FIEMAP_HEADER = struct.Struct("=QQIIII")
FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")


def progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def run(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """A bounded child; on timeout ``subprocess.run`` kills that child (and only it)."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}): "
                           f"{result.stderr.strip()[-1000:]}")
    return result


# -- files: space, sharing, page cache -----------------------------------------------------------


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def free_bytes(path: Path) -> int:
    """What ``df`` says is available: drops by what a copy really took, shared or not."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def shared_bytes(path: Path) -> int | None:
    """Bytes in extents the filesystem marks shared (a reflink), or None where FIEMAP is not
    supported. Unlike ``df``, other writers on the same filesystem do not disturb it."""
    count, start, shared = 256, 0, 0
    with path.open("rb") as file:
        for _ in range(100_000):  # 256 extents a call; far more than any image here has
            buffer = bytearray(FIEMAP_HEADER.size + count * FIEMAP_EXTENT.size)
            FIEMAP_HEADER.pack_into(buffer, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC,
                                    0, count, 0)
            try:
                fcntl.ioctl(file.fileno(), FS_IOC_FIEMAP, buffer)
            except OSError as error:
                if error.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    return None
                raise
            mapped = FIEMAP_HEADER.unpack_from(buffer)[3]
            if mapped == 0:
                return shared
            flags = 0
            for index in range(mapped):
                fields = FIEMAP_EXTENT.unpack_from(
                    buffer, FIEMAP_HEADER.size + index * FIEMAP_EXTENT.size)
                logical, length, flags = fields[0], fields[2], fields[5]
                if flags & FIEMAP_EXTENT_SHARED:
                    shared += length
                start = logical + length
            if flags & FIEMAP_EXTENT_LAST:
                return shared
    raise RuntimeError(f"FIEMAP of {path} did not end")


def filesystem(path: Path) -> str:
    with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
        return run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], 10).stdout.strip()
    return "unknown"


def drop_cache(paths: Sequence[Path]) -> None:
    """Evict just these files from the page cache: dirty pages stay, so ``fsync`` first."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached(paths: Sequence[Path]) -> dict[str, int]:
    """Bytes of each file in the page cache (``fincore``)."""
    output = run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,FILE",
                  *map(str, paths)], 30).stdout
    resident: dict[str, int] = {}
    for line in output.splitlines():
        size, _, name = line.partition(" ")
        resident[Path(name).name] = int(size)
    return resident


# -- making the versions -------------------------------------------------------------------------


def make_base(path: Path, size: int, rng: random.Random) -> int:
    """Random bytes in every MiB chunk but a few left as holes; returns the holes' bytes."""
    chunks = size // MIB
    holes = set(rng.sample(range(chunks), round(chunks * HOLE_SHARE)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for chunk in range(chunks):
            if chunk not in holes:
                os.pwrite(fd, os.urandom(MIB), chunk * MIB)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(holes) * MIB


def copy_sparse(source: Path, target: Path) -> dict[str, float]:
    """The copy the lead's ``version new`` makes: data ranges only, through the kernel."""
    started = time.perf_counter()
    fd_in = os.open(source, os.O_RDONLY)
    fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = os.fstat(fd_in).st_size
        os.ftruncate(fd_out, size)
        offset, copied = 0, 0
        for _ in range(size // 4096 + 2):  # each turn moves past one data range
            try:
                data = os.lseek(fd_in, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no data after offset
                    raise
                break
            hole = os.lseek(fd_in, data, os.SEEK_HOLE)
            position = data
            while position < hole:  # copy_file_range moves at least one byte or fails
                moved = os.copy_file_range(fd_in, fd_out, hole - position, position, position)
                if moved == 0:
                    raise RuntimeError(f"copy_file_range stopped at {position} of {source}")
                position += moved
            copied += hole - data
            offset = hole
            if offset >= size:
                break
        copy_seconds = time.perf_counter() - started
        os.fsync(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    return {"copy_seconds": copy_seconds, "with_fsync_seconds": time.perf_counter() - started,
            "copied_bytes": copied}


def changes(rng: random.Random, size: int, share: float) -> list[tuple[int, bytes]]:
    blocks = size // BLOCK
    picked = sorted(rng.sample(range(blocks), max(1, round(blocks * share))))
    return [(block * BLOCK, rng.randbytes(BLOCK)) for block in picked]


def write_full(path: Path, changed: Sequence[tuple[int, bytes]]) -> float:
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in changed:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def write_overlay(path: Path, changed: Sequence[tuple[int, bytes]], payloads: Path) -> float:
    """qemu-io fills a write from a file, so each changed block gets one (written untimed)."""
    payloads.mkdir(exist_ok=True)
    commands: list[str] = []
    for offset, data in changed:
        payload = payloads / f"{offset}.bin"
        if not payload.exists():
            payload.write_bytes(data)
        commands += ["-c", f"write -q -s {payload} {offset} {len(data)}"]
    started = time.perf_counter()
    run(["qemu-io", "-f", "qcow2", *commands, str(path)], 120)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def create_overlay(path: Path, backing: Path, backing_format: str, cluster: int) -> float:
    started = time.perf_counter()
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
         "-b", str(backing), "-F", backing_format, str(path)], 30)
    return time.perf_counter() - started


def build(work: Path, size: int, versions: int, share: float, seed: int) -> dict[str, Any]:
    """Versions 1 (the base, shared by both ways) to ``1 + versions``, kept both ways."""
    rng = random.Random(seed)
    base = work / "bench.v1.img"
    holes = make_base(base, size, rng)
    progress(f"base {size / MIB:,.0f} MiB, {holes / MIB:,.0f} MiB of holes, "
             f"{allocated(base) / MIB:,.0f} MiB allocated")
    rows: list[dict[str, Any]] = []
    for number in range(2, versions + 2):
        changed = changes(rng, size, share)
        previous_full = work / f"bench.v{number - 1}.img"
        full = work / f"bench.v{number}.img"
        free_before = free_bytes(work)
        made = copy_sparse(previous_full, full)
        made["write_seconds"] = write_full(full, changed)
        made["df_drop_bytes"] = free_before - free_bytes(work)
        row: dict[str, Any] = {"version": number, "changed_blocks": len(changed),
                               "changed_bytes": len(changed) * BLOCK, "full": made}
        for cluster, suffix in ((65536, "qcow2"), (16384, "c16k.qcow2")):
            overlay = work / f"bench.v{number}.{suffix}"
            backing, backing_format = (base, "raw") if number == 2 else (
                work / f"bench.v{number - 1}.{suffix}", "qcow2")
            row[f"qcow2_{cluster // 1024}k"] = {
                "create_seconds": create_overlay(overlay, backing, backing_format, cluster),
                "write_seconds": write_overlay(overlay, changed, work / f"payloads{number}"),
            }
        shutil.rmtree(work / f"payloads{number}")
        rows.append(row)
    for row in rows:  # sizes at the end: the later copies must not have moved them
        number = row["version"]
        full = work / f"bench.v{number}.img"
        row["full"]["allocated_bytes"] = allocated(full)
        row["full"]["shared_bytes"] = shared_bytes(full)
        for cluster, suffix in ((64, "qcow2"), (16, "c16k.qcow2")):
            row[f"qcow2_{cluster}k"]["allocated_bytes"] = allocated(
                work / f"bench.v{number}.{suffix}")
        progress(f"v{number}: full {row['full']['allocated_bytes'] / MIB:,.1f} MiB, qcow2 64k "
                 f"{row['qcow2_64k']['allocated_bytes'] / MIB:,.1f} MiB, 16k "
                 f"{row['qcow2_16k']['allocated_bytes'] / MIB:,.1f} MiB")
    head = versions + 1
    for suffix in ("qcow2", "c16k.qcow2"):
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(work / f"bench.v{head}.img"),
             str(work / f"bench.v{head}.{suffix}")], 120)
    cold_source = work / f"bench.v{head}.img"
    drop_cache([cold_source])
    cold_copy = copy_sparse(cold_source, work / "scratch.img")
    (work / "scratch.img").unlink()
    return {"base": {"size": size, "hole_bytes": holes, "allocated_bytes": allocated(base)},
            "versions": rows, "copy_from_cold_source": cold_copy, "heads_identical": True}


# -- serving and reading -------------------------------------------------------------------------


def files_of(party: str, work: Path, version: int) -> list[Path]:
    """The files a party's reads of ``version`` can touch (their page cache is dropped)."""
    if party == CHAIN:
        return [work / "bench.v1.img",
                *(work / f"bench.v{n}.qcow2" for n in range(2, version + 1))]
    return [work / f"bench.v{version}.img"]


def server_command(party: str, work: Path, version: int, sock: Path) -> list[str]:
    if party == FULL_NBDKIT:
        return ["nbdkit", "-f", "-r", "-U", str(sock), "file", str(work / f"bench.v{version}.img")]
    if party == FULL_QEMU:
        return ["qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-k", str(sock),
                str(work / f"bench.v{version}.img")]
    return ["qemu-nbd", "-r", "-t", "-e", "8", "-f", "qcow2", "-k", str(sock),
            str(work / f"bench.v{version}.qcow2")]


def cpu_seconds(pid: int) -> float:
    """User + system time of every thread so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serving(party: str, work: Path, version: int) -> Iterator[tuple[str, int]]:
    """One server for one measurement, so that none keeps format metadata from a run before:
    yields its NBD URI and pid, and ends that pid (SIGTERM, then SIGKILL) afterwards."""
    sock = work / "nbd.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log = (work / "servers.log").open("ab")
    process = subprocess.Popen(server_command(party, work, version, sock),
                               stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while True:  # bounded by the deadline
            if process.poll() is not None:
                raise RuntimeError(f"{party} server exited ({process.returncode}): see "
                                   f"{work / 'servers.log'}")
            if sock.exists():
                with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                    probe.connect(str(sock))
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{party} server did not listen on {sock} within 15 s")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}", process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # this pid only
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        log.close()


def nbdcopy(uri: str, size: int) -> float:
    """MB/s of the whole disk to ``null:``, process start and handshake included."""
    started = time.perf_counter()
    run(["nbdcopy", uri, "null:"], 120)
    return size / (time.perf_counter() - started) / 1e6


def fio_random(uri: str, size: int, seconds: float, ramp: float, output: Path) -> dict[str, float]:
    command = ["fio", "--name=versions", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
               "--bs=4k", "--iodepth=1", f"--size={size}", "--norandommap", "--randrepeat=0",
               "--time_based", f"--runtime={seconds:g}", f"--ramp_time={ramp:g}",
               "--output-format=json", f"--output={output}"]
    run(command, seconds + ramp + 60)
    job = json.loads(output.read_text())["jobs"][0]
    read = job["read"]
    if job["error"] or not read["total_ios"]:
        raise RuntimeError(f"fio against {uri} read nothing (error {job['error']})")
    return {"iops": read["iops"], "ops": read["total_ios"],
            "clat_mean_us": read["clat_ns"]["mean"] / 1e3}


def read_files(work: Path, head: int) -> list[Path]:
    return sorted({path for party in PARTIES for path in files_of(party, work, head)})


def read_dropped(paths: Sequence[Path]) -> dict[str, list[float]]:
    """MB/s of plain 1 MiB reads of each file just dropped from the page cache, twice.

    On a virtual machine the host may cache the virtual disk: a file read for the first time
    comes from the host's disk, later ones from its memory. The first pass puts every party's
    files in that same state, so that "cold" compares like with like; the second says what
    "cold" then means here."""
    rates: dict[str, list[float]] = {path.name: [] for path in paths}
    buffer = bytearray(MIB)
    for _ in range(2):
        for path in paths:
            drop_cache([path])
            fd = os.open(path, os.O_RDONLY)
            try:
                size, started = os.fstat(fd).st_size, time.perf_counter()
                for offset in range(0, size, MIB):
                    os.preadv(fd, [buffer], offset)
                rates[path.name].append(size / (time.perf_counter() - started) / 1e6)
            finally:
                os.close(fd)
            drop_cache([path])
    return rates


def measure_reads(work: Path, size: int, head: int, runs: int, seconds: float,
                  ramp: float) -> dict[str, list[dict[str, float]]]:
    """Each run: every party cold random, then cold and warm sequential and warm random; the
    parties' order turns each run so none always goes first."""
    all_files = read_files(work, head)
    results: dict[str, list[dict[str, float]]] = {party: [] for party in PARTIES}
    for number in range(runs):
        order = PARTIES[number % 3:] + PARTIES[:number % 3]
        for party in order:
            result: dict[str, float] = {}
            drop_cache(all_files)
            with serving(party, work, head) as (uri, _):
                cold = fio_random(uri, size, seconds, 0, work / "fio.json")
            result["rand_cold_iops"] = cold["iops"]
            drop_cache(all_files)
            result["left_in_cache_bytes"] = sum(cached(all_files).values())
            with serving(party, work, head) as (uri, pid):
                result["seq_cold_mb_s"] = nbdcopy(uri, size)
                cpu = cpu_seconds(pid)
                result["seq_warm_mb_s"] = nbdcopy(uri, size)
                result["seq_warm_server_ms_per_gib"] = (cpu_seconds(pid) - cpu) * 1e3 * GIB / size
                cpu = cpu_seconds(pid)
                warm = fio_random(uri, size, seconds, ramp, work / "fio.json")
                result["rand_warm_iops"] = warm["iops"]
                result["rand_warm_server_us"] = ((cpu_seconds(pid) - cpu) * 1e6
                                                 / (warm["ops"] + warm["iops"] * ramp))
            results[party].append(result)
            progress(f"run {number + 1} {party}: " + ", ".join(
                f"{key} {value:,.0f}" for key, value in result.items()))
    return results


def footprint(work: Path, size: int, head: int) -> dict[str, Any]:
    """Page cache held once the two newest versions were each read whole."""
    found: dict[str, Any] = {}
    for party, files in ((FULL_NBDKIT, [work / f"bench.v{n}.img" for n in range(1, head + 1)]),
                         (CHAIN, files_of(CHAIN, work, head))):
        drop_cache(files)
        steps: list[dict[str, Any]] = []
        for version in (head - 1, head):
            with serving(party, work, version) as (uri, _):
                nbdcopy(uri, size)
            resident = cached(files)
            steps.append({"read": version, "total_bytes": sum(resident.values()),
                          "files": resident})
        found[party] = steps
        progress(f"page cache, {party}: one version {steps[0]['total_bytes'] / MIB:,.0f} MiB, "
                 f"two {steps[1]['total_bytes'] / MIB:,.0f} MiB")
        drop_cache(files)
    return found


# -- report ---------------------------------------------------------------------------------------


def revision() -> str:
    with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
        return run(["git", "-C", str(HERE.parent), "describe", "--always", "--dirty"],
                   10).stdout.strip()
    return "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                            "python": platform.python_version()}
    for tool, flag in (("qemu-img", "--version"), ("nbdkit", "--version"), ("fio", "--version")):
        with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
            info[tool] = run([tool, flag], 10).stdout.splitlines()[0].strip()
    return info


def mib(value: float) -> str:
    return f"{value / MIB:,.1f}"


def print_report(report: dict[str, Any]) -> None:
    space = report["space"]
    rows = space["versions"]
    print(f"\n{report['settings']['size'] / MIB:,.0f} MiB base on {report['filesystem']}, "
          f"{space['base']['hole_bytes'] / MIB:,.0f} MiB of holes; each version changes "
          f"{rows[0]['changed_blocks']} blocks of 16 KiB ({mib(rows[0]['changed_bytes'])} MiB)")
    print(f"\n{'version':<8} {'full MiB':>9} {'shared':>7} {'df drop':>8} {'qcow2 64k':>10} "
          f"{'qcow2 16k':>10} | {'copy s':>7} {'+fsync s':>8} {'create s':>9} | "
          f"{'pwrite s':>8} {'qemu-io s':>9}")
    print(f"{'v1 base':<8} {mib(space['base']['allocated_bytes']):>9} {'':>7} {'':>8} "
          f"{'(shared)':>10} {'(shared)':>10} |")
    for row in rows:
        full, q64, q16 = row["full"], row["qcow2_64k"], row["qcow2_16k"]
        shared = "n/a" if full["shared_bytes"] is None else mib(full["shared_bytes"])
        print(f"{'v' + str(row['version']):<8} {mib(full['allocated_bytes']):>9} {shared:>7} "
              f"{mib(full['df_drop_bytes']):>8} {mib(q64['allocated_bytes']):>10} "
              f"{mib(q16['allocated_bytes']):>10} | {full['copy_seconds']:>7.2f} "
              f"{full['with_fsync_seconds']:>8.2f} {q64['create_seconds']:>9.3f} | "
              f"{full['write_seconds']:>8.3f} {q64['write_seconds']:>9.3f}")
    base = space["base"]["allocated_bytes"]
    print(f"{'all':<8} {mib(base + sum(r['full']['allocated_bytes'] for r in rows)):>9} "
          f"{'':>7} {'':>8} {mib(base + sum(r['qcow2_64k']['allocated_bytes'] for r in rows)):>10} "
          f"{mib(base + sum(r['qcow2_16k']['allocated_bytes'] for r in rows)):>10} |")
    cold = space["copy_from_cold_source"]
    print(f"copy of the head with its page cache dropped: {cold['copy_seconds']:.2f} s, "
          f"{cold['with_fsync_seconds']:.2f} s with fsync")
    reads = report["reads"]
    keys = (("seq_cold_mb_s", "nbdcopy cold MB/s"), ("seq_warm_mb_s", "nbdcopy warm MB/s"),
            ("rand_cold_iops", "4k QD1 cold IOPS"), ("rand_warm_iops", "4k QD1 warm IOPS"),
            ("seq_warm_server_ms_per_gib", "server CPU ms/GiB (warm seq)"),
            ("rand_warm_server_us", "server CPU us/read (warm 4k)"))
    print(f"\nreading the head (v{report['settings']['versions'] + 1}), medians of "
          f"{report['settings']['runs']} runs")
    print(f"{'':<30}" + "".join(f"{party:>26}" for party in PARTIES) + f"{'chain/full nbdkit':>19}")
    for key, label in keys:
        medians = [statistics.median(r[key] for r in reads[party]) for party in PARTIES]
        cells = []
        for party, median in zip(PARTIES, medians, strict=True):
            values = [r[key] for r in reads[party]]
            cells.append(f"{median:,.0f} ({min(values):,.0f}-{max(values):,.0f})")
        print(f"{label:<30}" + "".join(f"{cell:>26}" for cell in cells)
              + f"{medians[2] / medians[0]:>19.2f}")
    second = {name: rates[1] for name, rates in report["dropped_cache_reads"].items()}
    print("plain 1 MiB reads of a file dropped from the page cache (second pass), MB/s: "
          + ", ".join(f"{name} {rate:,.0f}" for name, rate in second.items()))
    print("\npage cache after reading whole versions (MiB):")
    for party, steps in report["footprint"].items():
        print(f"  {party:<26} one version {mib(steps[0]['total_bytes']):>8}   "
              f"two versions {mib(steps[1]['total_bytes']):>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=512 * MIB, help="base image (512M)")
    parser.add_argument("--versions", type=int, default=4, help="versions after the base (4)")
    parser.add_argument("--change", type=float, default=2.0,
                        help="percent of 16 KiB blocks each version changes (2)")
    parser.add_argument("--runs", type=int, default=5, help="runs of the reads; medians (5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="each random-read run (2)")
    parser.add_argument("--ramp", type=float, default=1.0, help="uncounted warm-up (1)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary directory goes (the filesystem measured)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"versions.py needs {', '.join(missing)} (Debian: qemu-utils, nbdkit, "
              "libnbd-bin, fio, util-linux)", file=sys.stderr)
        return 2
    if args.size % MIB or not 1 <= args.versions <= 20 or not 0 < args.change <= 50 \
            or not 1 <= args.runs <= 10 or not 0 < args.seconds <= 60:
        print("--size must be whole MiB, --versions 1..20, --change 0..50, --runs 1..10, "
              "--seconds up to 60", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    work = Path(tempfile.mkdtemp(prefix="pvs-versions-", dir=args.workdir))
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "revision": revision(),
        "machine": machine(), "filesystem": filesystem(work),
        "settings": {"size": args.size, "versions": args.versions, "change_percent": args.change,
                     "block": BLOCK, "runs": args.runs, "seconds": args.seconds,
                     "ramp": args.ramp, "seed": args.seed},
        "load_average": {"start": os.getloadavg()},
    }
    try:
        progress(f"building {args.versions + 1} versions both ways in {work} "
                 f"({report['filesystem']})")
        report["space"] = build(work, args.size, args.versions, args.change / 100, args.seed)
        head = args.versions + 1
        report["dropped_cache_reads"] = read_dropped(read_files(work, head))
        report["reads"] = measure_reads(work, args.size, head, args.runs, args.seconds, args.ramp)
        report["footprint"] = footprint(work, args.size, head)
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average"]["end"] = os.getloadavg()
    report["seconds"] = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    args.out.mkdir(parents=True, exist_ok=True)
    commit = report["revision"].split("-dirty")[0]
    path = args.out / f"versions-{started:%Y-%m-%d-%H%M}-{commit}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(f"\n{report['seconds']:.0f} s; load {report['load_average']['start'][0]:.1f} -> "
          f"{report['load_average']['end'][0]:.1f}; {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
