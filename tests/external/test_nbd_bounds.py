"""The export of ``pvs-target attach --nbd`` under floods, and its write cache filling up.

Real processes: a pvsd on loopback serving a Standard Image made with pvsctl, the real
``python -m pvs_target attach``, nbdinfo and qemu-io as the real NBD clients, and plain TCP
sockets as the flood.

- 1,100 idle TCP clients (the flood that once used up the target's file descriptors): the
  export keeps at most ``--nbd-max-clients`` (the default, 128) and drops the rest after the
  handshake deadline; its descriptor count (/proc/PID/fd) stays bounded, and meanwhile
  ``pvs-target status`` answers and nbdinfo reads the export.
- Clients past their handshake fill the cap: the next is refused at once; after one leaves, a
  new client is served.
- A 1 MiB write cache filled by qemu-io: warnings as use passes 80 % and 90 %, an error once
  a write is refused (ENOSPC), ``pvs-target status`` shows use and limit; after a discard the
  levels are logged again as they are passed again.

Only processes started here are signalled, by their own PID; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import PYTHON, Pvsd, make_vdisk, running
from nbd_tools import end, need, run

from pvs_target.nbd import wire as nbd

pytestmark = pytest.mark.external

MIB = 1 << 20
KIB = 1 << 10
VDISK = "disk"
ATTACH_TIMEOUT = 30.0
DEADLINE = 3.0
"""The handshake deadline given to the export here (the default is 10 s)."""
FLOOD = 1100
BACKLOG = 100
"""asyncio's default listen backlog, which the export uses."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclasses.dataclass
class Attached:
    process: subprocess.Popen[str]
    control: Path
    log: Path
    nbd: str
    """Where the export listens: HOST:PORT or unix:PATH."""

    @property
    def uri(self) -> str:
        if self.nbd.startswith("unix:"):
            return f"nbd+unix:///{VDISK}?socket={self.nbd[len('unix:'):]}"
        return f"nbd://{self.nbd}/{VDISK}"

    def status(self) -> dict[str, Any]:
        result = run(PYTHON, "-m", "pvs_target", "status", "--control", str(self.control),
                     "--json", timeout=30)
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def log_lines(self, event: str) -> list[str]:
        text = _ANSI.sub("", self.log.read_text(errors="replace"))
        return [line for line in text.splitlines() if re.search(rf"\b{event}\b", line)]

    def log_tail(self, count: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "--- pvs-target attach stderr ---\n" + "\n".join(lines[-count:])


@contextlib.contextmanager
def attached(server: Pvsd, nbd: str, *extra: str) -> Iterator[Attached]:
    """``pvs-target attach`` until its ``attached`` line; SIGTERM (then SIGKILL) by its PID on
    the way out, where it must exit 0. ``nbd`` "tcp" listens on a free loopback port."""
    workdir = Path(tempfile.mkdtemp(prefix="pvs-bounds-", dir="/tmp"))  # short socket paths
    control, log = workdir / "control.sock", workdir / "attach.log"
    address = "127.0.0.1:0" if nbd == "tcp" else f"unix:{workdir / 'nbd.sock'}"
    command = [PYTHON, "-m", "pvs_target", "-v", "attach", "--vdisk", VDISK, "--server",
               server.address, "--control", str(control), "--device-id", "bounds",
               "--nbd", address, *extra]
    process: subprocess.Popen[str] | None = None
    try:
        with log.open("w") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=log_file, text=True)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], ATTACH_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        target = Attached(process, control, log, "")
        assert line, f"attach printed nothing (exit {process.poll()})\n{target.log_tail()}"
        event = json.loads(line)
        assert event["event"] == "attached", line
        target.nbd = event["nbd"]
        yield target
        end(process)
        assert process.returncode == 0, \
            f"attach exited {process.returncode} on SIGTERM\n{target.log_tail()}"
    finally:
        if process is not None:
            end(process)
            if process.stdout is not None:
                process.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pvsd]:
    workdir = tmp_path_factory.mktemp("nbd-bounds")
    store = workdir / "store"
    make_vdisk(store, VDISK, 16 * MIB, seed=5)
    with running(Pvsd("bounds", store, workdir), vdisks=[VDISK]) as pvsd:
        yield pvsd


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def tcp(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def ended(sock: socket.socket) -> bool:
    """Whether the export has closed (or reset) this connection; reads what it sent."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def handshake(address: str) -> socket.socket:
    """A client that finishes the NBD handshake (OPT_GO, default export) and then idles."""
    sock = tcp(address)
    reader = sock.makefile("rb")
    magic, option_magic, flags = nbd.GREETING.unpack(reader.read(nbd.GREETING.size))
    assert (magic, option_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    sock.sendall(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.FIXED_NEWSTYLE
                                       | (flags & nbd.ClientFlag.NO_ZEROES)))
    request = nbd.U32.pack(0) + nbd.U16.pack(0)
    sock.sendall(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.Option.GO, len(request)) + request)
    for _ in range(64):
        _, _, kind, length = nbd.OPTION_REPLY.unpack(reader.read(nbd.OPTION_REPLY.size))
        reader.read(length)
        if kind == nbd.Reply.ACK:
            reader.close()
            return sock
    raise AssertionError("no ACK to NBD_OPT_GO")


def test_a_flood_of_idle_clients_is_capped_and_dropped_while_real_clients_are_served(
    server: Pvsd,
) -> None:
    need("nbdinfo")
    with attached(server, "tcp", "--nbd-handshake-timeout", str(DEADLINE)) as target:
        assert target.status()["nbd"]["max_clients"] == 128
        before = target.fds()
        flood: list[socket.socket] = []
        most = before
        try:
            for index in range(FLOOD):
                flood.append(tcp(target.nbd))
                if index % 100 == 99:
                    most = max(most, target.fds())
            most = max(most, target.fds())
            status = target.status()
            info = run("nbdinfo", "--json", target.uri, timeout=30)
            assert json.loads(info.stdout)["exports"][0]["export-size"] == 16 * MIB
            print(f"\n{FLOOD} idle NBD clients: attach had {before} fds before, at most {most} "
                  f"during the flood; status said {status['nbd']}")
            # The cap, and at most one burst of accepts (the listen backlog, 100) whose
            # evicted sockets close on the next loop turn; not one per flooding client.
            assert most <= before + 128 + BACKLOG + 16, f"{most} fds (from {before})"
            assert status["nbd"]["clients"] <= 128
            dropped = status["nbd"]["evicted"] + status["nbd"]["handshake_timeouts"]
            assert dropped >= FLOOD - 128 - BACKLOG, status  # some may not be accepted yet
            wait_until(lambda: all(ended(sock) for sock in flood),
                       "every idle client to be dropped", timeout=DEADLINE + 30)
            wait_until(lambda: target.fds() <= before + 2, "the descriptors to be released")
            after = target.status()["nbd"]
            assert after["clients"] == 0 and after["handshake_timeouts"] >= 1, after
            print(f"after the deadline: {target.fds()} fds; {after}")
        finally:
            for sock in flood:
                sock.close()
        evicted = target.log_lines("nbd_handshake_evicted")
        timeouts = target.log_lines("nbd_handshake_timeout")
        assert evicted and timeouts, target.log_tail()
        assert len(evicted) + len(timeouts) <= 10, "a line per connection"


def test_when_every_client_is_past_its_handshake_the_next_is_refused(server: Pvsd) -> None:
    need("nbdinfo")
    with attached(server, "tcp", "--nbd-max-clients", "2") as target:
        first, second = handshake(target.nbd), handshake(target.nbd)
        try:
            refused = tcp(target.nbd)
            wait_until(lambda: ended(refused), "the refused connection to be closed")
            refused.close()
            status = target.status()["nbd"]
            assert status["refused"] == 1 and status["clients"] == 2, status
            assert target.log_lines("nbd_connection_refused"), target.log_tail()
            first.close()
            wait_until(lambda: target.status()["nbd"]["clients"] == 1, "a client to leave")
            run("nbdinfo", target.uri, timeout=30)  # room again
        finally:
            first.close()
            second.close()


def test_the_write_cache_warns_at_80_90_and_100_percent(server: Pvsd) -> None:
    need("qemu-io")
    with attached(server, "unix", "--cache", "ram", "--cache-size", "1M") as target:

        def write(offset: int, length: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P 7 {offset} {length}", target.uri],
                capture_output=True, text=True, timeout=60, check=False,
                stdin=subprocess.DEVNULL,
            )

        def levels(event: str) -> list[str]:
            return [re.search(r"threshold=(\d+)", line).group(1)  # type: ignore[union-attr]
                    for line in target.log_lines(event)]

        assert write(0, 800 * KIB).returncode == 0  # 78 %
        assert levels("write_cache_filling") == []
        assert write(800 * KIB, 40 * KIB).returncode == 0  # 82 %
        assert levels("write_cache_filling") == ["80"]
        assert write(840 * KIB, 100 * KIB).returncode == 0  # 92 %
        assert levels("write_cache_filling") == ["80", "90"]
        assert write(900 * KIB, 60 * KIB).returncode == 0  # 94 %, no new level
        full = write(960 * KIB, 128 * KIB)
        assert full.returncode != 0 or "error" in (full.stdout + full.stderr).lower()
        assert levels("write_cache_full") == ["100"], target.log_tail()
        status = target.status()
        cache = status["write_cache"]
        assert cache["limit"] == MIB and cache["used"] == 960 * KIB, cache
        assert cache["refused_writes"] >= 1 and cache["percent"] == 93.8
        human = run(PYTHON, "-m", "pvs_target", "status", "--control", str(target.control))
        assert "write cache" in human.stdout and "960.0 KiB" not in human.stdout
        assert "0.9 MiB of 1.0 MiB used (93.8%" in human.stdout, human.stdout
        again = write(960 * KIB, 128 * KIB)  # refused again: no second line
        assert again.returncode != 0 or "error" in (again.stdout + again.stderr).lower()
        assert levels("write_cache_full") == ["100"]
        discard = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"discard 0 {600 * KIB}", target.uri],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )
        assert discard.returncode == 0, discard.stderr
        assert target.status()["write_cache"]["used"] == 360 * KIB
        assert write(0, 500 * KIB).returncode == 0  # 84 %: 80 is passed again
        assert levels("write_cache_filling") == ["80", "90", "80"]
