#!/usr/bin/env python3
"""The pvs network lab: a site of servers and a room of targets in network namespaces,
and the tools to break the network between them.

    python deploy/lab.py up --servers 3 --targets 4 --subnets 2 --workdir /tmp/pvslab
    python deploy/lab.py status
    python deploy/lab.py cut pvs1            # its cable pulled at the switch
    python deploy/lab.py restore pvs1        # cable back, netem removed
    python deploy/lab.py netem t2 --delay 50ms --loss 1%
    python deploy/lab.py stop-stream pvs2    # pvsctl, from inside the lab
    python deploy/lab.py start-stream pvs2
    python deploy/lab.py kill pvs3           # SIGKILL by recorded PID
    python deploy/lab.py start pvs3          # and back
    python deploy/lab.py down                # idempotent; also run on any failure of up

Every host is a network namespace named ``pvslab-HOST`` (servers pvs1.., targets t1..) with
one veth, ``eth0``, whose other end is a port named HOST on bridge br0, which lives in a
namespace of its own, ``pvslab-sw``. The host namespace gets no address or route into the
lab. Host k of a kind sits on subnet ((k - 1) mod subnets) + 1: 10.77.S.0/24, servers at .1x
and targets at .10x; both subnets share the one L2 bridge, so each host also has
10.77.0.0/16 on-link. Each server runs ``pvsd --subnet 10.77.S.0/24`` with one local store
holding a replica of vDisk ``labdisk`` copied with its identity kept (cp -p), subnet
affinity best_effort. Each target runs ``pvs-target attach`` (with ``--nbd`` when the
target supports it) and may run a reader (deploy/lab_reader.py) to put load on the site.

Everything created is written to WORKDIR/lab.json before or as it is created (namespaces,
and each process with its PID and start time), so ``down`` removes exactly that, even after a
crash, and never signals a process that merely reuses a recorded PID. Run as root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pvs_protocol.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
READER = Path(__file__).resolve().parent / "lab_reader.py"
PREFIX = "pvslab-"
SWITCH = PREFIX + "sw"
BRIDGE = "br0"
DEVICE = "eth0"
LAB_NETWORK = "10.77.0.0/16"
PORT = 6910
"""Stream port (TCP) and coordination port (UDP) of every server; admin API on PORT + 1."""
VDISK = "labdisk"
DEFAULT_WORKDIR = Path("/tmp/pvslab")
MIB = 1 << 20
START_TIMEOUT = 30.0
STOP_TIMEOUT = 8.0
ROLES_IN_STOP_ORDER = ("reader", "attach", "pvsd")


class LabError(Exception):
    """The lab could not do what was asked; the message says why and what to do."""


# -- the plan ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    role: str
    """"server" or "target"."""
    subnet: int
    address: str

    @property
    def namespace(self) -> str:
        return PREFIX + self.name

    @property
    def network(self) -> str:
        return f"10.77.{self.subnet}.0/24"

    @property
    def stream(self) -> str:
        return f"{self.address}:{PORT}"

    @property
    def admin(self) -> str:
        return f"{self.address}:{PORT + 1}"


@dataclasses.dataclass
class Process:
    role: str
    """"pvsd", "attach" or "reader"."""
    host: str
    pid: int
    start_time: int
    """Clock ticks after boot (/proc/PID/stat field 22): tells our process from a PID reuser."""
    log: str


@dataclasses.dataclass
class State:
    workdir: str
    servers: list[Host]
    targets: list[Host]
    size: int
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[Process] = dataclasses.field(default_factory=list)
    cut: list[str] = dataclasses.field(default_factory=list)
    netem: dict[str, str] = dataclasses.field(default_factory=dict)
    sha256: str = ""
    """Of the vDisk's bytes: what every whole pass of a reader must hash to."""
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Of the vDisk's manifest (ReplicaIdentity.to_json): what every target must pin."""
    nbd: bool = False
    nbd_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        data = dict(data)
        data["servers"] = [Host(**h) for h in data["servers"]]
        data["targets"] = [Host(**h) for h in data["targets"]]
        data["processes"] = [Process(**p) for p in data["processes"]]
        return cls(**data)


def plan(workdir: Path, servers: int, targets: int, subnets: int, size: int) -> State:
    if not 1 <= servers <= 9 or not 0 <= targets <= 90 or not 1 <= subnets <= 9:
        raise LabError("the lab holds 1..9 servers, 0..90 targets and 1..9 subnets")
    if size <= 0 or size % MIB:
        raise LabError("--size must be a positive whole number of MiB")
    server_hosts = [
        Host(f"pvs{i}", "server", (i - 1) % subnets + 1, f"10.77.{(i - 1) % subnets + 1}.{10 + i}")
        for i in range(1, servers + 1)
    ]
    target_hosts = [
        Host(f"t{j}", "target", (j - 1) % subnets + 1, f"10.77.{(j - 1) % subnets + 1}.{100 + j}")
        for j in range(1, targets + 1)
    ]
    return State(str(workdir), server_hosts, target_hosts, size)


# -- the lab -----------------------------------------------------------------------------------


class Lab:
    """Build, break and remove a lab. Every method is bounded in time; `down` is idempotent."""

    def __init__(
        self,
        workdir: Path = DEFAULT_WORKDIR,
        *,
        servers: int = 3,
        targets: int = 4,
        subnets: int = 2,
        size: int = 32 * MIB,
        nbd: str = "auto",
        python: str = sys.executable,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.python = python
        self.nbd_wanted = nbd
        """"auto" (use --nbd if the target supports it), "on" (require it) or "off"."""
        self.state = plan(self.workdir, servers, targets, subnets, size)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @classmethod
    def load(cls, workdir: Path = DEFAULT_WORKDIR) -> Lab:
        """The lab recorded in ``workdir`` (by an ``up`` in this or another process)."""
        path = Path(workdir).resolve() / "lab.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {workdir} (no lab.json): run 'up' first") from None
        lab = cls(Path(workdir))
        lab.state = State.from_json(data)
        return lab

    # -- paths and lookups -----------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.workdir / "lab.json"

    @property
    def key_file(self) -> Path:
        return self.workdir / "site.key"

    def store(self, server: Host) -> Path:
        return self.workdir / "stores" / server.name

    def control(self, target: Host) -> Path:
        return self.workdir / "run" / f"{target.name}.control"

    def nbd_socket(self, target: Host) -> Path:
        return self.workdir / "run" / f"{target.name}.nbd"

    def reader_report(self, target: Host) -> Path:
        return self.workdir / "run" / f"{target.name}.reader.json"

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    @property
    def hosts(self) -> list[Host]:
        return [*self.state.servers, *self.state.targets]

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise LabError(f"no host {name!r} in the lab; hosts: {known}")

    def server(self, name: str) -> Host:
        host = self.host(name)
        if host.role != "server":
            raise LabError(f"{name} is a target, not a server")
        return host

    def save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.state.to_json(), indent=1))
        os.replace(temporary, self.state_path)

    # -- up --------------------------------------------------------------------------------

    def up(self, *, load_seconds: float = 0.0) -> None:
        """Build the network, the site and the targets; on any failure, tear all down."""
        require_root()
        if self.state_path.exists():
            recorded = State.from_json(json.loads(self.state_path.read_text()))
            if recorded.namespaces or recorded.processes:
                raise LabError(f"a lab is recorded in {self.workdir}: run 'down' first")
        clash = sorted(set(existing_namespaces()) & {SWITCH, *(h.namespace for h in self.hosts)})
        if clash:
            raise LabError(
                f"namespace(s) {', '.join(clash)} exist already (another lab?): run 'down' with "
                "that lab's --workdir, or 'ip netns del NAME' if you know it is stale"
            )
        try:
            # What an earlier lab in this workdir left: the lab's own files only.
            self.key_file.unlink(missing_ok=True)
            for directory in ("stores", "run", "logs"):
                shutil.rmtree(self.workdir / directory, ignore_errors=True)
                (self.workdir / directory).mkdir(parents=True)
            self.save()
            self._build_network()
            self._make_site()
            self._start_servers()
            self._start_targets()
            if load_seconds > 0:
                for target in self.state.targets:
                    self.start_reader(target.name, seconds=load_seconds)
        except BaseException:
            self.down()
            raise

    def _build_network(self) -> None:
        self._add_namespace(SWITCH)
        ip("-n", SWITCH, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", SWITCH, "link", "set", BRIDGE, "up")
        for host in self.hosts:
            self._add_namespace(host.namespace)
            ip("-n", SWITCH, "link", "add", host.name, "type", "veth",
               "peer", "name", DEVICE, "netns", host.namespace)
            ip("-n", SWITCH, "link", "set", host.name, "master", BRIDGE, "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", DEVICE)
            ip("-n", host.namespace, "link", "set", DEVICE, "up")
            ip("-n", host.namespace, "route", "add", LAB_NETWORK, "dev", DEVICE)

    def _add_namespace(self, name: str) -> None:
        self.state.namespaces.append(name)  # recorded first: down removes even a half-made one
        self.save()
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")

    def _make_site(self) -> None:
        """Site key, and one vDisk replicated to every server with its identity kept."""
        self.pvsctl("site", "keygen", "--output", str(self.key_file))
        first = self.store(self.state.servers[0])
        for server in self.state.servers:
            self.store(server).mkdir(parents=True, exist_ok=True)
        source = self.workdir / f"{VDISK}.source"
        with source.open("wb") as output:
            for _ in range(self.state.size // MIB):
                output.write(os.urandom(MIB))
        try:
            self.pvsctl("vdisk", "import", str(source), "--name", VDISK, "--store", str(first))
        finally:
            source.unlink(missing_ok=True)
        self.pvsctl(
            "vdisk", "set", VDISK, "--store", str(first), "--subnet-affinity", "best_effort"
        )
        for server in self.state.servers[1:]:
            # The version's manifest travels with the image (the manifest first, as
            # docs/deploy.md says), so every server checks its copy against the one manifest
            # instead of making its own; never the verified record nor a lock.
            for suffix in (".manifest", ".vdisk.toml", ".img"):
                shutil.copy2(first / f"{VDISK}{suffix}", self.store(server) / f"{VDISK}{suffix}")
        self.state.sha256 = sha256_of(first / f"{VDISK}.img")
        manifest = Manifest.decode((first / f"{VDISK}.manifest").read_bytes())
        self.state.identity = manifest.identity.to_json()
        self.save()

    def _start_servers(self) -> None:
        for server in self.state.servers:
            self._spawn_server(server)
        deadline = time.monotonic() + START_TIMEOUT
        for server in self.state.servers:
            self.wait_for_log(server.name, "listening", deadline)
            self.wait_for_log(
                server.name, "identity_published", deadline, vdisk=VDISK,
                identity=self._identity_label(),
            )
            for other in self.state.servers:
                if other is not server:
                    self.wait_for_log(server.name, "peer_inventory", deadline, peer=other.name)

    def _spawn_server(self, server: Host) -> Process:
        peers = [arg for other in self.state.servers if other is not server
                 for arg in ("--peer", other.stream)]
        return self.spawn(server, "pvsd", [
            self.python, "-m", "pvsd", "--name", server.name, "--listen", server.stream,
            "--store", str(self.store(server)), "--key-file", str(self.key_file),
            "--subnet", server.network, "--drain-timeout", "5", "--log-json", *peers,
        ])

    def start_server(self, name: str) -> None:
        """Start the server's pvsd again (after kill); return once it serves the vDisk."""
        server = self.server(name)
        record = self.process(name, "pvsd")
        if record is not None and self.alive(record):
            raise LabError(f"pvsd on {name} is running already")
        if record is not None:
            self._forget(record)
        since = self.log(name).stat().st_size if self.log(name).exists() else 0
        self._spawn_server(server)
        deadline = time.monotonic() + START_TIMEOUT
        self.wait_for_log(name, "listening", deadline, since=since)
        self.wait_for_log(
            name, "identity_published", deadline, since=since, vdisk=VDISK,
            identity=self._identity_label(),
        )

    def _identity_label(self) -> str:
        """How pvsd logs the identity of the manifest copied to every server
        (ReplicaIdentity.short). A server that made a manifest of its own would publish
        another one, and its copy would not be identical to the others: waiting for this
        label, not for any identity, catches that."""
        identity = self.state.identity
        return f"v{identity['version']}:{identity['digest'][:12]}"

    def _start_targets(self) -> None:
        targets = self.state.targets
        if not targets:
            return
        use_nbd = self.nbd_wanted != "off"
        if use_nbd:  # try the first target; the NBD export may not exist in this version
            try:
                self._attach([targets[0]], nbd=True)
            except LabError as error:
                if self.nbd_wanted == "on":
                    raise
                self.state.nbd_error = str(error).splitlines()[-1][:300]
                use_nbd = False
                self._attach([targets[0]], nbd=False)
            targets = targets[1:]
        self.state.nbd = use_nbd
        self.save()
        self._attach(targets, nbd=use_nbd)

    def _attach(self, targets: Sequence[Host], *, nbd: bool) -> None:
        servers = [arg for server in self.state.servers for arg in ("--server", server.stream)]
        for target in targets:
            out = self.workdir / "logs" / f"{target.name}.out"
            out.unlink(missing_ok=True)
            command = [
                self.python, "-m", "pvs_target", "-v", "attach", *servers, "--vdisk", VDISK,
                "--device-id", target.name, "--control", str(self.control(target)),
            ]
            if nbd:
                command += ["--nbd", f"unix:{self.nbd_socket(target)}"]
            self.spawn(target, "attach", command, stdout=out)
        deadline = time.monotonic() + START_TIMEOUT
        for target in targets:
            self._wait_attached(target, deadline)

    def _wait_attached(self, target: Host, deadline: float) -> dict[str, Any]:
        out = self.workdir / "logs" / f"{target.name}.out"
        process = self.process(target.name, "attach")
        for _ in range(int(START_TIMEOUT / 0.05) + 1):
            with contextlib.suppress(FileNotFoundError):
                for line in out.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if isinstance(event, dict) and event.get("event") == "attached":
                            return event
            if process is None or not self.alive(process):
                if process is not None:
                    self._forget(process)
                raise LabError(
                    f"pvs-target attach on {target.name} exited before attaching:\n"
                    + tail(self.log(target.name))
                )
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise LabError(f"{target.name} did not attach in time:\n{tail(self.log(target.name))}")

    # -- processes -------------------------------------------------------------------------

    def spawn(
        self, host: Host, role: str, command: list[str], *, stdout: Path | None = None
    ) -> Process:
        """Run ``command`` in the host's namespace, recorded (PID, start time) at once."""
        log_path = self.log(host.name if role != "reader" else f"{host.name}-reader")
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        with contextlib.ExitStack() as files:
            log_file = files.enter_context(log_path.open("ab"))
            out_file = files.enter_context(stdout.open("ab")) if stdout else log_file
            child = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, *command], stdin=subprocess.DEVNULL,
                stdout=out_file, stderr=log_file, cwd=ROOT, env=environment,
                start_new_session=True,
            )
        self._children[child.pid] = child
        record = Process(role, host.name, child.pid, start_time(child.pid), str(log_path))
        self.state.processes.append(record)
        self.save()
        return record

    def process(self, host: str, role: str) -> Process | None:
        for record in self.state.processes:
            if record.host == host and record.role == role:
                return record
        return None

    def alive(self, record: Process) -> bool:
        child = self._children.get(record.pid)
        if child is not None:
            return child.poll() is None
        return record.start_time != 0 and start_time(record.pid) == record.start_time

    def _signal(self, record: Process, signum: int) -> None:
        if self.alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signum)

    def _stop(self, records: Iterable[Process], timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait (bounded), SIGKILL what is left, reap our children."""
        records = list(records)
        for record in records:
            self._signal(record, signal.SIGTERM)
        self._wait_gone(records, timeout)
        for record in records:
            self._signal(record, signal.SIGKILL)
        self._wait_gone(records, 5)
        for record in records:
            self._forget(record)

    def _wait_gone(self, records: list[Process], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if not any(self.alive(r) for r in records) or time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def _forget(self, record: Process) -> None:
        child = self._children.pop(record.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        if record in self.state.processes:
            self.state.processes.remove(record)
        self.save()

    def wait_for_log(
        self, host: str, event: str, deadline: float, *, since: int = 0, **fields: str
    ) -> None:
        """Wait until pvsd on ``host`` logs ``event`` (with ``fields``) after byte ``since``
        of its log; bounded."""
        path = self.log(host)
        record = self.process(host, "pvsd")
        for _ in range(int(START_TIMEOUT / 0.05) + 1):
            for line in _read_lines(path, since):
                if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                    return
            if record is None or not self.alive(record):
                raise LabError(f"pvsd on {host} exited:\n{tail(path)}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise LabError(f"pvsd on {host} did not log {event} {fields} in time:\n{tail(path)}")

    # -- down ------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop every recorded process and delete every recorded namespace. Idempotent."""
        if not self._children and self.state_path.exists():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.state = State.from_json(json.loads(self.state_path.read_text()))
        for role in (*ROLES_IN_STOP_ORDER, None):
            self._stop(
                r for r in list(self.state.processes)
                if r.role == role or (role is None and r.role not in ROLES_IN_STOP_ORDER)
            )
        existing = set(existing_namespaces())
        for namespace in reversed(list(self.state.namespaces)):
            if namespace in existing:
                ip("netns", "del", namespace, check=False)
            self.state.namespaces.remove(namespace)
        self.state.cut.clear()
        self.state.netem.clear()
        if self.workdir.exists():
            self.save()

    # -- faults ----------------------------------------------------------------------------

    def cut(self, name: str) -> None:
        """Pull the host's cable at the switch: its link goes down, every packet is lost."""
        host = self.host(name)
        ip("-n", SWITCH, "link", "set", host.name, "down")
        if name not in self.state.cut:
            self.state.cut.append(name)
        self.save()

    def restore(self, name: str) -> None:
        """Cable back in and no more netem: the host's network as it was built."""
        host = self.host(name)
        ip("-n", SWITCH, "link", "set", host.name, "up")
        for namespace, device in ((host.namespace, DEVICE), (SWITCH, host.name)):
            run(["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device, "root"],
                check=False)
        with contextlib.suppress(ValueError):
            self.state.cut.remove(name)
        self.state.netem.pop(name, None)
        self.save()

    def netem(self, name: str, *, delay: str = "", loss: str = "", rate: str = "") -> None:
        """Delay, loss and/or rate on the host's link, in both directions (each side's
        egress): a round trip gets twice the delay. Rate alone uses tbf, which works on
        kernels without netem."""
        host = self.host(name)
        if not (delay or loss or rate):
            raise LabError("give --delay, --loss and/or --rate")
        if delay or loss:
            qdisc = ["netem", *(["delay", delay] if delay else []),
                     *(["loss", loss] if loss else []), *(["rate", rate] if rate else [])]
        else:
            qdisc = ["tbf", "rate", rate, "burst", "64kb", "latency", "100ms"]
        for namespace, device in ((host.namespace, DEVICE), (SWITCH, host.name)):
            result = run(["ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev",
                          device, "root", *qdisc], check=False)
            if result.returncode != 0:
                hint = (" (this kernel has no netem: it needs the sch_netem module; --rate "
                        "alone works without it)") if "unknown" in result.stderr else ""
                raise LabError(f"tc {' '.join(qdisc)} on {name}: {result.stderr.strip()}{hint}")
        self.state.netem[name] = " ".join(qdisc)
        self.save()

    def stop_stream(self, name: str) -> str:
        return self._stream(name, "stop")

    def start_stream(self, name: str) -> str:
        return self._stream(name, "start")

    def _stream(self, name: str, action: str) -> str:
        """pvsctl {stop,start}-stream, run inside a server namespace (another one if it can:
        the admin API of any server reaches the whole site)."""
        self.server(name)
        via = self._admin_via(avoid=name)
        return self.pvsctl(f"{action}-stream", name, via=via, timeout=90)

    def site_command(self, *args: str, timeout: float = 120) -> str:
        """A site-wide pvsctl command, run in a server namespace against its admin API."""
        return self.pvsctl(*args, via=self._admin_via(), timeout=timeout)

    def _admin_via(self, avoid: str = "") -> Host:
        candidates = [
            s for s in self.state.servers
            if s.name not in self.state.cut and (r := self.process(s.name, "pvsd")) is not None
            and self.alive(r)
        ]
        candidates.sort(key=lambda s: s.name == avoid)
        if not candidates:
            raise LabError("no server is running and reachable to run pvsctl against")
        return candidates[0]

    def kill(self, name: str) -> None:
        """SIGKILL the server's pvsd by its recorded PID: a crash, not a stop."""
        record = self.process(self.server(name).name, "pvsd")
        if record is None or not self.alive(record):
            raise LabError(f"pvsd on {name} is not running")
        self._signal(record, signal.SIGKILL)
        for _ in range(100):
            if not self.alive(record):
                break
            time.sleep(0.05)
        self._forget(record)

    # -- load ------------------------------------------------------------------------------

    def start_reader(self, name: str, *, seconds: float = 300.0, rate: float = 16e6) -> Process:
        """A bounded reader in the target's namespace (deploy/lab_reader.py): through the
        attach's NBD export when there is one, else through a failover stream of its own."""
        target = self.host(name)
        report = self.reader_report(target)
        report.unlink(missing_ok=True)
        command = [
            self.python, str(READER), "--report", str(report), "--sha256", self.state.sha256,
            "--size", str(self.state.size), "--vdisk", VDISK, "--seconds", str(seconds),
            "--rate", str(rate),
        ]
        if self.state.nbd:
            command += ["--nbd", f"unix:{self.nbd_socket(target)}"]
        else:
            command += ["--device-id", f"{target.name}-reader"]
            command += [arg for s in self.state.servers for arg in ("--server", s.stream)]
        return self.spawn(target, "reader", command)

    def stop_readers(self) -> dict[str, dict[str, Any]]:
        """Stop every reader; return each target's final report."""
        self._stop([r for r in list(self.state.processes) if r.role == "reader"], timeout=15)
        reports = {}
        for target in self.state.targets:
            with contextlib.suppress(FileNotFoundError, ValueError):
                reports[target.name] = json.loads(self.reader_report(target).read_text())
        return reports

    # -- looking ---------------------------------------------------------------------------

    def target_status(self, name: str, *, cli: bool = True) -> dict[str, Any]:
        """``pvs-target status --json`` run in the target's namespace; with ``cli=False`` the
        same answer straight from its control socket (a unix socket: no network), faster."""
        target = self.host(name)
        if not cli:
            from pvs_target.control import query

            return asyncio.run(query(str(self.control(target)), timeout=5))
        result = run(["ip", "netns", "exec", target.namespace, self.python, "-m", "pvs_target",
                      "status", "--control", str(self.control(target)), "--json"],
                     check=True, timeout=30)
        answer = json.loads(result.stdout)
        assert isinstance(answer, dict)
        return answer

    def servers_view(self) -> list[dict[str, Any]]:
        """``pvsctl servers --json`` from inside the lab: the site as its servers see it."""
        answer = json.loads(self.pvsctl("servers", "--json", via=self._admin_via()))
        return list(answer.get("servers", []))

    def pvsctl(self, *args: str, via: Host | None = None, timeout: float = 60) -> str:
        """The real pvsctl: on the local store when ``via`` is None, else in ``via``'s
        namespace against its admin API."""
        command = [self.python, "-m", "pvsd.ctl"]
        if via is not None:
            command = ["ip", "netns", "exec", via.namespace, *command,
                       "--admin", via.admin, "--key-file", str(self.key_file)]
        result = run([*command, *args], check=False, timeout=timeout)
        if result.returncode != 0:
            raise LabError(f"pvsctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def status(self) -> dict[str, Any]:
        view: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(LabError, ValueError):
            view = {s.get("name") or "": s for s in self.servers_view()}
        servers = []
        for server in self.state.servers:
            record = self.process(server.name, "pvsd")
            seen = view.get(server.name, {})
            servers.append({
                "name": server.name, "address": server.stream, "subnet": server.network,
                "pid": record.pid if record else None,
                "running": bool(record and self.alive(record)),
                "cut": server.name in self.state.cut, "netem": self.state.netem.get(server.name),
                "state": seen.get("state"), "up": seen.get("up"), "targets": seen.get("targets"),
            })
        targets = []
        for target in self.state.targets:
            record = self.process(target.name, "attach")
            entry: dict[str, Any] = {
                "name": target.name, "address": target.address, "subnet": target.network,
                "pid": record.pid if record else None,
                "running": bool(record and self.alive(record)),
                "cut": target.name in self.state.cut, "netem": self.state.netem.get(target.name),
            }
            try:
                status = self.target_status(target.name)
            except (subprocess.SubprocessError, ValueError, AssertionError) as error:
                entry["error"] = str(error)
            else:
                entry["server"] = status.get("server")
                entry["state"] = status.get("state")
                entry["failovers"] = status.get("failovers", [])
            with contextlib.suppress(FileNotFoundError, ValueError):
                report = json.loads(self.reader_report(target).read_text())
                entry["reader"] = {k: report[k] for k in ("mode", "passes", "good_passes")}
                entry["reader"]["errors"] = len(report["errors"]) + len(report["mismatches"])
            targets.append(entry)
        return {
            "workdir": str(self.workdir), "vdisk": VDISK, "sha256": self.state.sha256,
            "identity": self.state.identity,
            "nbd": self.state.nbd, "nbd_error": self.state.nbd_error,
            "servers": servers, "targets": targets,
        }


# -- helpers -----------------------------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veths, tc): run it with sudo")
    if shutil.which("ip") is None:
        raise LabError("'ip' (iproute2) is not installed: apt-get install -y iproute2")


def run(
    command: Sequence[str], *, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(command)}: {result.stderr.strip() or result.returncode}")
    return result


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *args], check=check)


def existing_namespaces() -> list[str]:
    result = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, or 0 when the process is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return 0 if fields[0] == "Z" else int(fields[19])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _read_lines(path: Path, since: int = 0) -> list[dict[str, Any]]:
    """The JSON objects among the lines of a log, from byte ``since`` on."""
    lines = []
    with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
        file.seek(since)
        for line in file.read().decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    lines.append(event)
    return lines


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab.py", description="pvs network lab (network namespaces; run as root)."
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help="build the lab and start servers and targets")
    up.add_argument("--servers", type=int, default=3)
    up.add_argument("--targets", type=int, default=4)
    up.add_argument("--subnets", type=int, default=2)
    up.add_argument("--size", type=int, default=32, help="vDisk size in MiB (default 32)")
    up.add_argument("--nbd", choices=("auto", "on", "off"), default="auto",
                    help="pvs-target attach --nbd: when it works (auto), always, never")
    up.add_argument("--load", type=float, default=0.0, metavar="SECONDS",
                    help="also run a reader in every target for this long")
    commands.add_parser("down", help="stop everything and remove the namespaces")
    status = commands.add_parser("status", help="servers, targets, who streams from where")
    status.add_argument("--json", action="store_true")
    for name, text in (("cut", "pull the host's cable"), ("restore", "undo cut and netem")):
        command = commands.add_parser(name, help=text)
        command.add_argument("host")
    netem = commands.add_parser("netem", help="delay/loss/rate on a host's link (tc)")
    netem.add_argument("host")
    netem.add_argument("--delay", default="", help="e.g. 50ms (each direction)")
    netem.add_argument("--loss", default="", help="e.g. 1%%")
    netem.add_argument("--rate", default="", help="e.g. 10mbit")
    for name, text in (
        ("stop-stream", "pvsctl stop-stream: move the server's targets away"),
        ("start-stream", "pvsctl start-stream"),
        ("kill", "SIGKILL the server's pvsd"),
        ("start", "start a killed server's pvsd again"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("server")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        require_root()
        if args.command == "up":
            lab = Lab(args.workdir, servers=args.servers, targets=args.targets,
                      subnets=args.subnets, size=args.size * MIB, nbd=args.nbd)
            lab.up(load_seconds=args.load)
            print_status(lab.status())
            return 0
        if args.command == "down":
            with contextlib.suppress(LabError):
                Lab.load(args.workdir).down()
            print(f"lab in {args.workdir} is down")
            return 0
        lab = Lab.load(args.workdir)
        if args.command == "status":
            status = lab.status()
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                print_status(status)
        elif args.command == "cut":
            lab.cut(args.host)
        elif args.command == "restore":
            lab.restore(args.host)
        elif args.command == "netem":
            lab.netem(args.host, delay=args.delay, loss=args.loss, rate=args.rate)
        elif args.command == "stop-stream":
            print(lab.stop_stream(args.server), end="")
        elif args.command == "start-stream":
            print(lab.start_stream(args.server), end="")
        elif args.command == "kill":
            lab.kill(args.server)
        elif args.command == "start":
            lab.start_server(args.server)
    except LabError as error:
        print(f"lab: {error}", file=sys.stderr)
        return 2
    return 0


def print_status(status: dict[str, Any]) -> None:
    nbd = "NBD export" if status["nbd"] else f"no NBD export ({status['nbd_error'] or 'off'})"
    print(f"lab in {status['workdir']}: vDisk {status['vdisk']} "
          f"sha256 {status['sha256'][:16]}…, manifest "
          f"v{status['identity'].get('version', '?')}:{status['identity'].get('digest', '')[:12]}"
          f", targets with {nbd}")
    print(f"{'server':<8}{'address':<18}{'pid':>8}  {'process':<8}{'link':<6}{'state':<10}"
          f"{'up':<6}targets")
    for s in status["servers"]:
        targets = "?" if s["targets"] is None else s["targets"]
        print(f"{s['name']:<8}{s['address']:<18}{s['pid'] or '-':>8}  "
              f"{'running' if s['running'] else 'gone':<8}{'CUT' if s['cut'] else 'ok':<6}"
              f"{s['state'] or '?':<10}{s['up']!s:<6}{targets}"
              + (f"  netem: {s['netem']}" if s["netem"] else ""))
    print(f"{'target':<8}{'address':<18}{'pid':>8}  {'process':<8}{'link':<6}streams from")
    for t in status["targets"]:
        server = t.get("server") or {}
        where = (f"{server.get('name')} at {server.get('address')} ({t.get('state')}, "
                 f"{len(t.get('failovers', []))} failovers)") if "error" not in t else t["error"]
        reader = t.get("reader")
        if reader:
            where += (f"; reader: {reader['good_passes']}/{reader['passes']} passes good, "
                      f"{reader['errors']} errors")
        print(f"{t['name']:<8}{t['address']:<18}{t['pid'] or '-':>8}  "
              f"{'running' if t['running'] else 'gone':<8}{'CUT' if t['cut'] else 'ok':<6}{where}"
              + (f"  netem: {t['netem']}" if t["netem"] else ""))


if __name__ == "__main__":
    sys.exit(main())
