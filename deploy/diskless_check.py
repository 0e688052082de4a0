#!/usr/bin/python3
"""The verifying workload of a diskless test machine (built by ``deploy/diskless.py --check``).

Runs as a systemd service on the machine whose root is a vDisk, and talks on a serial port
that the host reads (the VM test, ``./scripts/demo vm``), never over the network it checks:

- it reads back, over and over, files of random bytes made when the image was built, with the
  page cache dropped first so that every pass reads the vDisk through pvs-target, and checks
  each against its SHA-256;
- it writes a new file of random bytes on every pass, syncs it (into pvs-target's write
  cache), drops the cache and checks it as read back;
- every pass ends with one line: ``PASS n files f read r MiB wrote w MiB errors e``; any
  failure is a ``FAIL`` line naming the file and the error;
- the host may send ``status`` (answered by ``STATUS`` and pvs-target's status as JSON on
  one line), ``mem`` (``MEM`` and where the memory goes), ``stop`` (the passes end;
  ``STOPPED n errors e``) and ``poweroff``.

Uses the standard library only: it runs on the machine's own Python.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

DATA = Path("/var/lib/pvs-check")
WRITES = Path("/var/tmp/pvs-check")
WRITE_SIZE = 4 << 20
KEEP_WRITTEN = 4


class Port:
    """The serial port: one line at a time, from any thread."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        subprocess.run(["stty", "-F", path, "raw", "-echo", "115200"], check=False)
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.lock:
            os.write(self.fd, (line + "\n").encode())

    def lines(self) -> Iterator[str]:
        pending = b""
        while True:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return
            pending += chunk.replace(b"\r", b"\n")
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    yield line.decode(errors="replace").strip()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_checked(path: Path, expected: str) -> int:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(f"content differs from the SHA-256 it was written with ({size} bytes)")
    return size


class Workload:
    def __init__(self, port: Port) -> None:
        self.port = port
        self.stopping = threading.Event()
        self.passes = 0
        self.errors = 0
        self.sums = [
            (DATA / name, digest)
            for digest, name in (line.split() for line in (DATA / "SHA256SUMS").read_text()
                                 .splitlines())
        ]

    def fail(self, what: str, error: BaseException) -> None:
        self.errors += 1
        self.port.say(f"FAIL pass {self.passes + 1} {what}: {type(error).__name__}: {error}")

    def one_pass(self) -> None:
        read = written = 0
        WRITES.mkdir(parents=True, exist_ok=True)
        content = os.urandom(WRITE_SIZE)
        mine = WRITES / f"w{self.passes:06}"
        try:
            with mine.open("wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            written += len(content)
        except OSError as error:
            self.fail(f"writing {mine}", error)
        drop_caches()
        for path, digest in self.sums:
            try:
                read += read_checked(path, digest)
            except (OSError, ValueError) as error:
                self.fail(f"reading {path}", error)
        try:
            read += read_checked(mine, hashlib.sha256(content).hexdigest())
        except (OSError, ValueError) as error:
            self.fail(f"reading back {mine}", error)
        for old in sorted(WRITES.iterdir())[:-KEEP_WRITTEN]:
            old.unlink()
        self.passes += 1
        self.port.say(f"PASS {self.passes} files {len(self.sums) + 1} read {read >> 20} MiB "
                      f"wrote {written >> 20} MiB errors {self.errors}")

    def run(self) -> None:
        while not self.stopping.is_set():
            self.one_pass()
        self.port.say(f"STOPPED {self.passes} errors {self.errors}")


def status_line() -> str:
    result = subprocess.run(["/usr/local/bin/pvs-target", "status", "--json"],
                            capture_output=True, text=True, check=False)
    text = result.stdout if result.returncode == 0 else result.stderr
    return "STATUS " + " ".join(text.split())


def memory_line() -> str:
    """Where the machine's memory goes: pvs-target's resident set, its runtime's tmpfs, and
    what is left (KiB)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()[0]
    pid = Path("/run/sendsigs.omit.d/pvs-target").read_text().strip()
    rss = next((line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:")), "?")
    usage = os.statvfs("/run/pvs-target")
    runtime = (usage.f_blocks - usage.f_bfree) * usage.f_frsize >> 10
    return (f"MEM pvs-target_rss_kib {rss} runtime_tmpfs_kib {runtime} "
            f"total_kib {fields['MemTotal']} available_kib {fields['MemAvailable']}")


def main() -> int:
    port = Port(sys.argv[1] if len(sys.argv) > 1 else "/dev/ttyS1")
    workload = Workload(port)
    port.say(f"READY files {len(workload.sums)}")
    port.say(status_line())
    worker = threading.Thread(target=workload.run, daemon=True)
    worker.start()
    for command in port.lines():
        if command == "status":
            port.say(status_line())
        elif command == "mem":
            port.say(memory_line())
        elif command == "stop":
            workload.stopping.set()
            worker.join()
        elif command == "poweroff":
            workload.stopping.set()
            worker.join()
            port.say("POWEROFF")
            subprocess.run(["systemctl", "poweroff"], check=False)
        else:
            port.say(f"UNKNOWN {command}")
        time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
