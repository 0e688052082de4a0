#!/usr/bin/env python3
"""A bounded reader for the lab: reads one vDisk again and again, from inside a target's
network namespace, and reports after every pass whether the bytes were the right ones.

Two ways to read, chosen by the lab:
- ``--nbd URI``: through the attached target's NBD export with ``nbdcopy``, which is what a
  machine's block device would read. The attach fails over; the reader never notices.
- ``--server ... --vdisk NAME``: through ``pvs_target.failover.VDiskStream``, the same
  failover code ``pvs-target attach`` runs, as a session of its own. The lab uses this while
  ``pvs-target attach --nbd`` is not available.

``pvs-target read`` is not used here: it logs in once and has no failover, so a server cut in
mid-pass fails that pass by design, which would hide real read errors among expected ones.

The report (``--report FILE``, replaced atomically after every pass) holds the passes, every
error, every digest that did not match ``--sha256``, the servers seen and the failover
history. The reader ends after ``--seconds`` or on SIGTERM; an unfinished pass is dropped,
not counted as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
DEPTH = 4
MAX_PASSES = 100_000
STALL_SECONDS = 30.0
"""A read that waits longer than this is reported as an error (the lab's failovers take
seconds; a read stuck this long is a finding, not patience)."""


class Report:
    def __init__(self, path: Path, mode: str, expected: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "mode": mode, "pid": os.getpid(), "expected_sha256": expected, "passes": 0,
            "good_passes": 0, "bytes": 0, "errors": [], "mismatches": [], "servers": [],
            "history": [], "longest_wait_ms": 0.0, "started": time.time(), "finished": False,
        }

    def error(self, text: str) -> None:
        self.data["errors"].append({"at": time.time(), "error": text})
        self.save()

    def server(self, name: str) -> None:
        servers: list[str] = self.data["servers"]
        if name and (not servers or servers[-1] != name):
            servers.append(name)

    def finish_pass(self, digest: str, size: int) -> None:
        self.data["passes"] += 1
        self.data["bytes"] += size
        if digest == self.data["expected_sha256"]:
            self.data["good_passes"] += 1
        else:
            self.data["mismatches"].append({"pass": self.data["passes"], "sha256": digest})
        self.save()

    def save(self, *, finished: bool = False) -> None:
        self.data["updated"] = time.time()
        self.data["finished"] = finished
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        os.replace(temporary, self.path)


class Pacer:
    """Holds a reader to ``rate`` bytes per second, so that the lab's servers keep time."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.done = 0

    def delay(self, size: int) -> float:
        self.done += size
        if self.rate <= 0:
            return 0.0
        return max(0.0, self.start + self.done / self.rate - time.monotonic())


# -- through VDiskStream -----------------------------------------------------------------------


async def read_stream(args: argparse.Namespace, report: Report, stop: threading.Event) -> None:
    from pvs_target.failover import FailoverSettings, VDiskStream

    settings = FailoverSettings(keepalive_interval=0.5, dead_after=1.5, connect_timeout=1.0)
    stream = VDiskStream(args.server, args.vdisk, args.device_id, settings=settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with asyncio.timeout(30):
        await stream.open()
    pacer = Pacer(args.rate)
    deadline = time.monotonic() + args.seconds
    try:
        for _ in range(MAX_PASSES):
            if stop.is_set() or time.monotonic() > deadline:
                break
            digest = await _stream_pass(stream, args.size, report, pacer, stop)
            report.data["history"] = [record.to_json() for record in stream.history]
            report.data["longest_wait_ms"] = round(stream.longest_wait_ms, 1)
            if digest is None:
                report.save()
                continue
            report.finish_pass(digest, args.size)
    finally:
        await stream.close()


async def _stream_pass(
    stream: Any, size: int, report: Report, pacer: Pacer, stop: threading.Event
) -> str | None:
    """One whole pass, DEPTH reads in flight, hashed in order; None if stopped or failed."""
    sha256 = hashlib.sha256()
    queue: deque[asyncio.Task[bytes]] = deque()
    offsets = iter(range(0, size, CHUNK))
    try:
        for _ in range(size // CHUNK + 2):
            for offset in offsets:
                queue.append(asyncio.create_task(stream.read(offset, min(CHUNK, size - offset))))
                if len(queue) >= DEPTH:
                    break
            if not queue:
                return sha256.hexdigest()
            head = queue[0]
            waited_until = time.monotonic() + STALL_SECONDS
            for _ in range(int(STALL_SECONDS / 0.2) + 1):
                if head.done() or stop.is_set() or time.monotonic() > waited_until:
                    break
                await asyncio.wait({head}, timeout=0.2)
            if stop.is_set():
                return None
            if not head.done():
                report.error(f"a read waited more than {STALL_SECONDS:g} s")
                return None
            queue.popleft()
            try:
                data = head.result()
            except Exception as error:  # the point of the lab: there must be none
                report.error(f"read failed: {error!r}")
                return None
            sha256.update(data)
            status = stream.status()
            report.server((status.get("server") or {}).get("name", ""))
            await asyncio.sleep(pacer.delay(len(data)))
        report.error("internal: a pass did not end")  # unreachable: the loop is bounded
        return None
    finally:
        for task in queue:
            task.cancel()
        await asyncio.gather(*queue, return_exceptions=True)


# -- through the attach's NBD export -----------------------------------------------------------


def read_nbd(args: argparse.Namespace, report: Report, stop: threading.Event) -> None:
    uri = _export_uri(args.nbd, args.vdisk)
    report.data["uri"] = uri
    pacer = Pacer(args.rate)
    deadline = time.monotonic() + args.seconds
    for _ in range(MAX_PASSES):
        if stop.is_set() or time.monotonic() > deadline:
            break
        digest = _nbd_pass(uri, args.size, report, pacer, stop)
        if digest is None:
            report.save()
            continue
        report.finish_pass(digest, args.size)


def _nbd_pass(
    uri: str, size: int, report: Report, pacer: Pacer, stop: threading.Event
) -> str | None:
    sha256 = hashlib.sha256()
    received = 0
    process = subprocess.Popen(
        ["nbdcopy", uri, "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    watchdog = threading.Timer(STALL_SECONDS * 4, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None and process.stderr is not None
        for _ in range(size // CHUNK + 2):  # the pipe may hand over less than CHUNK
            chunk = process.stdout.read(CHUNK)
            if not chunk:
                break
            received += len(chunk)
            sha256.update(chunk)
            if stop.is_set() or received > size:
                process.kill()
                if received > size:
                    report.error(f"nbdcopy gave more than the vDisk's {size} bytes")
                return None
            time.sleep(pacer.delay(len(chunk)))
        else:
            report.error("nbdcopy output did not end")
            return None
        errors = process.stderr.read().decode(errors="replace").strip()
        code = process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    if code != 0:
        report.error(f"nbdcopy exited {code}: {errors[-300:]}")
        return None
    return sha256.hexdigest()


def _export_uri(address: str, vdisk: str) -> str:
    """An NBD URI for ``unix:PATH`` or ``HOST:PORT``, naming the export the server lists."""
    if address.startswith("unix:"):
        base, query = "nbd+unix:///", f"?socket={address[5:]}"
    else:
        base, query = f"nbd://{address}/", ""
    names = [vdisk]
    if shutil.which("nbdinfo"):
        listing = subprocess.run(
            ["nbdinfo", "--list", "--json", base + query], capture_output=True, text=True,
            timeout=20, check=False,
        )
        with contextlib.suppress(ValueError, KeyError, TypeError):
            names = [e["export-name"] for e in json.loads(listing.stdout)["exports"]] or names
    return base + names[0] + query


# -- command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--sha256", required=True, help="what every whole pass must hash to")
    parser.add_argument("--size", type=int, required=True, help="bytes of the vDisk")
    parser.add_argument("--vdisk", required=True)
    parser.add_argument("--server", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--device-id", default="lab-reader")
    parser.add_argument("--nbd", metavar="unix:PATH|HOST:PORT")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop after this long")
    parser.add_argument("--rate", type=float, default=16e6, help="bytes per second; 0: no cap")
    args = parser.parse_args(argv)
    if not args.nbd and not args.server:
        parser.error("give --nbd, or --server (repeatable)")
    report = Report(args.report, "nbd" if args.nbd else "stream", args.sha256)
    report.save()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        if args.nbd:
            read_nbd(args, report, stop)
        else:
            asyncio.run(read_stream(args, report, stop))
    except Exception as error:
        report.error(f"reader failed: {error!r}")
        report.save(finished=True)
        return 1
    report.save(finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
