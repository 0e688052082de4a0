"""The processes ``bench/run.py`` starts: pvsd, a three-server site, pvs-target, nbdkit.

Every process is started through one `Children` registry and ended by its own pid (SIGTERM,
then SIGKILL after a bounded wait) in the caller's ``finally``; nothing is ever signalled by
name. Every wait is bounded in time. Everything listens on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stream import _run, _wait_for

STOP_TIMEOUT = 15.0


class Child:
    """One started process, its log file, and what /proc says about it."""

    def __init__(self, name: str, process: subprocess.Popen[Any], log_path: Path) -> None:
        self.name, self.process, self.log_path = name, process, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, all threads (``/proc/PID/stat`` utime + stime)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tree_cpu_seconds(self) -> float:
        """CPU time of this process and of every live descendant (a server's worker
        processes), plus the children it has reaped: what the whole server costs."""
        return tree_cpu_seconds(self.pid)

    def memory_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    events.append(record)
        return events

    def wait_for_log(self, event: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """The first JSON log line with this event and these fields (a field may be a
        predicate); raise with the log's tail if the process exits or time runs out."""
        found: list[dict[str, Any]] = []

        def done() -> bool:
            for record in self.log_events():
                if record.get("event") == event and all(
                    key in record and (want(record[key]) if callable(want) else record[key] == want)
                    for key, want in fields.items()
                ):
                    found.append(record)
                    return True
            return False

        try:
            _wait_for(f"{self.name} to log {event} {fields}", done, self.process, timeout=timeout)
        except RuntimeError as error:
            tail = "\n".join(self.log_text().strip().splitlines()[-8:])
            raise RuntimeError(f"{error}\n--- {self.log_path} ---\n{tail}") from None
        return found[0]

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM this pid; SIGKILL it if it has not exited in ``timeout`` seconds."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {self.pid}) ignored SIGTERM: killing", file=sys.stderr)
                self.kill()
        self._close_pipes()

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()  # SIGKILL to this pid only
        self.process.wait(timeout=STOP_TIMEOUT)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all threads, and its reaped children's) and of each live
    descendant, from /proc; a process that ends between two reads counts as nothing."""
    parents: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        number = int(entry.name)
        parents.setdefault(int(fields[1]), []).append(number)
        times[number] = sum(int(field) for field in fields[11:15]) / tick
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        total += times.get(current, 0.0)
        pending += parents.get(current, [])
    return total


class Children:
    """Starts processes and ends every one of them, newest first, in ``stop_all``."""

    def __init__(self, logs: Path, environment: dict[str, str]) -> None:
        self.logs, self.environment = logs, environment
        self.started: list[Child] = []

    def start(
        self, name: str, command: Sequence[str], *, pipes: bool = False,
        environment: dict[str, str] | None = None,
    ) -> Child:
        """Start ``command`` with stdout and stderr in ``LOGS/NAME.log`` (or, with ``pipes``,
        stdin and stdout as text pipes and stderr in the log)."""
        log_path = self.logs / f"{name}.log"
        for number in range(2, 1000):  # a log of its own: waits read the whole file
            if not log_path.exists():
                break
            log_path = self.logs / f"{name}.{number}.log"
        with log_path.open("xb") as log_file:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log_file,
                stderr=log_file,
                env={**(environment or self.environment), "PYTHONUNBUFFERED": "1"},
                text=pipes,
                # `python -m pvsd` imports from its working directory first: started in the
                # checkout, a child would run the work tree's code whatever --source says
                cwd=self.logs,
            )
        child = Child(name, process, log_path)
        self.started.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        with contextlib.suppress(ValueError):
            self.started.remove(child)

    def stop_all(self) -> None:
        while self.started:
            child = self.started.pop()
            try:
                child.stop()
            except Exception as error:  # go on ending the others
                print(f"could not stop {child.name} (pid {child.pid}): {error}", file=sys.stderr)


ONE_SOURCE = ("--max-connections-per-source", "100000")
"""Every simulated target of a benchmark connects from the same loopback address, where a real
site has one machine per address: lift pvsd's per-source cap for them."""

@contextlib.contextmanager
def children(logs: Path, environment: dict[str, str]) -> Iterator[Children]:
    registry = Children(logs, environment)
    try:
        yield registry
    finally:
        registry.stop_all()


def free_port(host: str, span: int = 2, attempts: int = 50) -> int:
    """A port on ``host`` such that it and the ``span - 1`` after it are free (pvsd puts its
    admin API on the listen port + 1)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port + span - 1 <= 65535 and all(_free(host, p) for p in range(port, port + span)):
            return port
    raise RuntimeError(f"no {span} free ports in a row on {host} after {attempts} attempts")


def _free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


# -- pvsd ---------------------------------------------------------------------------------------


def start_pvsd(
    registry: Children, name: str, address: str, store: Path, extra: Sequence[str] = (),
    timeout: float = 300.0,
) -> Child:
    """``python -m pvsd`` serving ``store``; returns once it listens and has published the
    identity of vDisk ``bench`` (hashing a fresh 1 GiB image takes a few seconds)."""
    command = [
        sys.executable, "-m", "pvsd", "--name", name, "--listen", address, "--store", str(store),
        "--log-json", "--log-level", "info", *ONE_SOURCE, *extra,
    ]
    child = registry.start(name, command)
    child.wait_for_log("listening", timeout)
    child.wait_for_log("identity_published", timeout, vdisk="bench")
    return child


def link_store(image: Path, directory: Path) -> Path:
    """A store of its own holding a hard link of ``image`` (one inode, one page cache, the
    same identity) and a copy of its properties. Make every link before any pvsd starts:
    a new link changes the image's ctime, which makes a running pvsd hash it again."""
    directory.mkdir(parents=True)
    os.link(image, directory / image.name)
    properties = image.with_name(image.name.removesuffix(".img") + ".vdisk.toml")
    if properties.exists():
        shutil.copy2(properties, directory / properties.name)
    return directory


class Site:
    """Three (or more) pvsd with a site key, each on its own loopback address and store."""

    def __init__(
        self, registry: Children, work: Path, stores: Sequence[Path], powers: Sequence[float],
        hosts: Sequence[str], label: str,
    ) -> None:
        self.registry, self.label = registry, label
        self.key = work / "site.key"
        if not self.key.exists():
            self.key.write_text(secrets.token_hex(32) + "\n")  # what `pvsctl site keygen` writes
            self.key.chmod(0o600)
        self.names = [f"s{index}" for index in range(1, len(stores) + 1)]
        self.stores = dict(zip(self.names, stores, strict=True))
        self.powers = dict(zip(self.names, powers, strict=True))
        self.addresses: dict[str, str] = {}
        self.admins: dict[str, str] = {}
        for name, host in zip(self.names, hosts, strict=True):
            port = free_port(host)
            self.addresses[name] = f"{host}:{port}"
            self.admins[name] = f"{host}:{port + 1}"
        self.servers: dict[str, Child] = {}

    def start(self, timeout: float = 300.0) -> None:
        for name in self.names:
            peers = [a for other, a in self.addresses.items() if other != name]
            extra = [
                "--power", str(self.powers[name]), "--key-file", str(self.key),
                "--admin", self.admins[name], *[arg for p in peers for arg in ("--peer", p)],
            ]
            command = [
                sys.executable, "-m", "pvsd", "--name", name, "--listen", self.addresses[name],
                "--store", str(self.stores[name]), "--log-json", "--log-level", "info",
                *ONE_SOURCE, *extra,
            ]
            self.servers[name] = self.registry.start(f"{self.label}-{name}", command)
        for server in self.servers.values():
            server.wait_for_log("listening", timeout)
            server.wait_for_log("identity_published", timeout, vdisk="bench")
        for name, server in self.servers.items():  # every server knows every other's vDisks
            for other in self.names:
                if other != name:
                    server.wait_for_log(
                        "peer_inventory", 30, peer=other, vdisks=lambda count: count >= 1
                    )
        time.sleep(1.0)  # a heartbeat or two, so that every view holds every server's load

    def stop(self) -> None:
        for server in self.servers.values():
            self.registry.stop(server)

    def pvsctl(self, *args: str, via: str, timeout: float = 90.0) -> str:
        command = [sys.executable, "-m", "pvsd.ctl", "--admin", self.admins[via],
                   "--key-file", str(self.key), *args]
        return _run(command, timeout, self.registry.environment).stdout


# -- pvs-target ---------------------------------------------------------------------------------


def start_attach(
    registry: Children, name: str, servers: Sequence[str], nbd_socket: Path, control: Path,
    device_id: str, timeout: float = 120.0,
) -> Child:
    """``pvs-target attach`` with its default settings, exporting vDisk ``bench`` over NBD on
    a unix socket; returns once it says "attached"."""
    command = [sys.executable, "-m", "pvs_target", "attach", "--vdisk", "bench",
               "--device-id", device_id, "--nbd", f"unix:{nbd_socket}", "--control", str(control)]
    for server in servers:
        command += ["--server", server]
    child = registry.start(name, command)

    def attached() -> bool:
        return '"event": "attached"' in child.log_text() and nbd_socket.exists()

    _wait_for(f"{name} to attach", attached, child.process, timeout=timeout)
    return child


def target_status(control: Path, environment: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "pvs_target", "status", "--control", str(control), "--json"]
    status: dict[str, Any] = json.loads(_run(command, 15, environment).stdout)
    return status


# -- nbdkit -------------------------------------------------------------------------------------


def start_nbdkit(registry: Children, name: str, where: Sequence[str], plugin: Sequence[str],
                 work: Path) -> Child:
    """``nbdkit -f -r WHERE PLUGIN...``; returns once it accepts connections (its pidfile)."""
    pidfile = work / f"{name}.pid"
    child = registry.start(name, ["nbdkit", "-f", "-r", *where, "-P", str(pidfile), *plugin])
    _wait_for(f"{name} to listen", pidfile.exists, child.process, timeout=30)
    return child


def until(what: str, done: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    """Poll ``done`` until it is true; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(step)
