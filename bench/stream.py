"""Streaming throughput of pvsd beside nbdkit, measured alternately in one run.

    python bench/stream.py [--size 1G] [--runs 3] [--seconds 5] [--json OUT] [--profile DIR]

One random image is made in a temporary directory, imported into a vDisk store, and read into
the page cache. That one file is then served three ways over loopback:

- ``pvsd`` on 127.0.0.1 (TCP), read by ``bench/pvs_client.py``: the pvs_target client library
  on uvloop, in its own process. pvs has no NBD export yet, so pvs is measured through its
  native library while the peers are measured through NBD: the clients differ, the image, the
  machine and the moment do not.
- ``nbdkit -r file IMG`` on a unix socket and ``nbdkit -r file IMG`` on 127.0.0.1 TCP (one hop
  each), read by fio (``--ioengine=nbd``) and nbdcopy.

Every run measures each workload with pvs and with the peers back to back, pvs first in odd runs
and last in even runs, so that a neighbour's load lands on both sides; the table shows medians.
Every child process is bounded by a timeout and ended by its own pid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from profile_summary import Profile, find_py_spy, print_profiles, summarize
from report import print_tables

from pvs_protocol import sizes

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "pvs_client.py"
MIB = 1 << 20

Measurement = dict[str, Any]
"""One raw result: at least ``value`` (MB/s or IOPS) and ``tool``."""


def parse_size(text: str) -> int:
    size = sizes.parse_size(text)
    if size < MIB or size % MIB:
        raise argparse.ArgumentTypeError("size must be a whole number of MiB, at least 1M")
    return size


# -- processes ------------------------------------------------------------------------------


class Servers:
    """pvsd and the two nbdkit servers; each is ended by its own pid in ``stop``."""

    def __init__(self, work: Path, image: Path, environment: dict[str, str]) -> None:
        self.work, self.image, self.store = work, image, image.parent
        self.environment = environment
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pvs_address = ""
        self.nbd_unix = f"nbd+unix:///?socket={work / 'nbdkit.sock'}"
        self.nbd_tcp = ""

    def start(self) -> None:
        self._start_pvsd()
        self._start_nbdkit("nbdkit-unix", ["-U", str(self.work / "nbdkit.sock")])
        port = _free_port()
        self._start_nbdkit("nbdkit-tcp", ["-p", str(port), "-i", "127.0.0.1"])
        self.nbd_tcp = f"nbd://127.0.0.1:{port}"

    def stop(self) -> None:
        for name, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                process.terminate()  # SIGTERM to this pid only
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    print(f"{name} (pid {process.pid}) ignored SIGTERM: killing", file=sys.stderr)
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU time of that server so far, all its threads (from /proc)."""
        stat = Path(f"/proc/{self.pid(name)}/stat").read_text()
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _start_pvsd(self) -> None:
        log_path = self.work / "pvsd.log"
        command = [
            sys.executable, "-m", "pvsd", "--name", "bench", "--listen", "127.0.0.1:0",
            "--store", str(self.store), "--log-json", "--log-level", "info",
        ]
        with log_path.open("wb") as log_file:
            self.processes["pvsd"] = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=self.environment, cwd=self.work,  # not the checkout: see Children.start
            )
        events: dict[str, dict[str, Any]] = {}

        def ready() -> bool:
            for line in log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    events.setdefault(record.get("event", ""), record)
            if "identity_failed" in events:
                raise RuntimeError(f"pvsd could not hash the image: see {log_path}")
            return "listening" in events and "identity_published" in events

        try:
            _wait_for("pvsd to listen and publish the image's identity", ready,
                      self.processes["pvsd"], timeout=300)
        except RuntimeError as error:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError("\n".join([str(error), *tail])) from None
        self.pvs_address = events["listening"]["address"]

    def _start_nbdkit(self, name: str, where: list[str]) -> None:
        pidfile = self.work / f"{name}.pid"  # nbdkit writes it once it accepts connections
        command = ["nbdkit", "-f", "-r", *where, "-P", str(pidfile), "file", str(self.image)]
        self.processes[name] = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        _wait_for(f"{name} to listen", pidfile.exists, self.processes[name], timeout=30)


def _wait_for(
    what: str, done: Callable[[], bool], process: subprocess.Popen[bytes], *, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None:
            raise RuntimeError(f"gave up waiting for {what}: it exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def python_environment(source: Path | None) -> dict[str, str]:
    """The environment of pvsd, pvsctl and the client: ``source`` first on the import path."""
    environment = dict(os.environ)
    if source is not None:
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(source.resolve()), environment.get("PYTHONPATH", "")])
        )
    return environment


def _run(
    command: list[str], timeout: float, environment: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a bounded child; on timeout ``subprocess.run`` kills that child (and only it)."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env=environment, cwd="/",  # not the checkout: see Children.start
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{command[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return result


# -- the tools ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    size: int
    seconds: float
    ramp: float
    work: Path


def pvs_client(
    servers: Servers, settings: Settings, workload: str, depth: int, *, checksum: bool = True,
    wrapper: tuple[str, ...] = (),
) -> Measurement:
    command = [*wrapper, sys.executable, str(CLIENT), "--server", servers.pvs_address,
               "--vdisk", "bench"]
    if not checksum:
        command.append("--no-checksum")
    command += [workload, "--depth", str(depth)]
    if workload == "rand":
        command += ["--seconds", str(settings.seconds), "--ramp", str(settings.ramp)]
    result = _run(command, settings.ramp + settings.seconds + 180, servers.environment)
    last = [line for line in result.stdout.splitlines() if line.startswith("{")][-1]
    measured: Measurement = json.loads(last)
    if workload == "seq" and measured["bytes"] != settings.size:
        raise RuntimeError(f"pvs client read {measured['bytes']} of {settings.size} bytes")
    measured["value"] = measured["mb_s"] if workload == "seq" else measured["iops"]
    return measured


def fio(
    uri: str, settings: Settings, workload: str, depth: int, *, timed: bool = False
) -> Measurement:
    """One fio job. ``seq`` reads the whole disk once in 1 MiB reads, or with ``timed`` (as
    ``bench/run.py`` and ANCHORS.md do) for ``settings.seconds`` after the ramp, like ``rand``
    (4 KiB random reads)."""
    output = settings.work / "fio.json"
    command = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--iodepth={depth}",
               f"--size={settings.size}", "--output-format=json", f"--output={output}"]
    timing = ["--time_based", f"--runtime={settings.seconds:g}", f"--ramp_time={settings.ramp:g}"]
    if workload == "seq":  # one pass over the whole disk, like pvs and nbdcopy
        command += ["--rw=read", "--bs=1M", *(timing if timed else ["--runtime=120"])]
    else:
        command += ["--rw=randread", "--bs=4k", "--norandommap", "--randrepeat=0", *timing]
    _run(command, timeout=settings.ramp + settings.seconds + 180)
    job = json.loads(output.read_text())["jobs"][0]
    read = job["read"]
    if job["error"] or not read["io_bytes"]:
        raise RuntimeError(f"fio against {uri} read nothing (error {job['error']})")
    if workload == "seq" and not timed and read["io_bytes"] != settings.size:
        raise RuntimeError(f"fio read {read['io_bytes']} of {settings.size} bytes")
    percentiles = read["clat_ns"].get("percentile", {})
    value = read["bw_bytes"] / 1e6 if workload == "seq" else read["iops"]
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * read["runtime"] / 1e3  # after the ramp
    return {"tool": "fio", "uri": uri, "depth": depth, "value": value, "cpu_seconds": cpu,
            "bytes": read["io_bytes"], "ops": read["total_ios"], "seconds": read["runtime"] / 1e3,
            "mb_s": read["bw_bytes"] / 1e6, "iops": read["iops"],
            "clat_mean_us": read["clat_ns"]["mean"] / 1e3,
            "clat_p99_us": percentiles.get("99.000000", 0) / 1e3,
            "clat_max_us": read["clat_ns"]["max"] / 1e3}


def nbdcopy(uri: str, settings: Settings) -> Measurement:
    """Whole disk to ``null:`` with nbdcopy's defaults, timed from outside: its process start
    and NBD handshake (under 10 ms) count against it."""
    cpu_before = _children_cpu()
    start = time.perf_counter()
    _run(["nbdcopy", uri, "null:"], timeout=180)
    seconds = time.perf_counter() - start
    mb_s = settings.size / seconds / 1e6
    return {"tool": "nbdcopy", "uri": uri, "value": mb_s, "bytes": settings.size,
            "seconds": seconds, "mb_s": mb_s, "cpu_seconds": _children_cpu() - cpu_before}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the workloads --------------------------------------------------------------------------

Tool = Callable[[], Measurement]


@dataclasses.dataclass
class Workload:
    key: str
    label: str
    unit: str
    pvs: Tool
    peers: dict[str, Tool]
    runs: dict[str, list[Measurement]] = dataclasses.field(default_factory=dict)

    def median(self, who: str) -> float:
        return statistics.median(run["value"] for run in self.runs[who])

    def cpu(self, who: str, side: str) -> float:
        """Median CPU cost of ``side`` ("server" or "client") per unit of work."""
        return statistics.median(run.get(f"{side}_cpu", float("nan")) for run in self.runs[who])

    def spread(self, who: str) -> float:
        """Half the range of the runs, relative to their median."""
        values = [run["value"] for run in self.runs[who]]
        middle = statistics.median(values)
        return (max(values) - min(values)) / 2 / middle if middle else 0.0


PEER_UNIX, PEER_TCP = "nbdkit unix", "nbdkit TCP"
SERVER_OF = {"pvs": "pvsd", PEER_UNIX: "nbdkit-unix", PEER_TCP: "nbdkit-tcp"}


def workloads(servers: Servers, settings: Settings) -> list[Workload]:
    def client(workload: str, depth: int, checksum: bool = True) -> Tool:
        return lambda: pvs_client(servers, settings, workload, depth, checksum=checksum)

    def fio_peers(workload: str, depth: int) -> dict[str, Tool]:
        return {
            PEER_UNIX: lambda: fio(servers.nbd_unix, settings, workload, depth),
            PEER_TCP: lambda: fio(servers.nbd_tcp, settings, workload, depth),
        }

    return [
        Workload("seq_qd8", "seq 1M QD8: read_range depth 8 | fio", "MB/s",
                 client("seq", 8), fio_peers("seq", 8)),
        Workload("seq_qd8_nocrc", "seq 1M QD8, no CRC | fio", "MB/s",
                 client("seq", 8, checksum=False), fio_peers("seq", 8)),
        Workload("seq_qd1", "seq 1M QD1: read loop | fio", "MB/s",
                 client("seq", 1), fio_peers("seq", 1)),
        Workload("seq_qd1_nocrc", "seq 1M QD1, no CRC | fio", "MB/s",
                 client("seq", 1, checksum=False), fio_peers("seq", 1)),
        Workload("copy", "whole disk: read_range depth 32 | nbdcopy", "MB/s",
                 client("seq", 32), {
                     PEER_UNIX: lambda: nbdcopy(servers.nbd_unix, settings),
                     PEER_TCP: lambda: nbdcopy(servers.nbd_tcp, settings),
                 }),
        Workload("rand_qd1", "rand 4k QD1: 1 worker | fio", "IOPS",
                 client("rand", 1), fio_peers("rand", 1)),
        Workload("rand_qd32", "rand 4k QD32: 32 workers | fio", "IOPS",
                 client("rand", 32), fio_peers("rand", 32)),
    ]


def measure(
    plan: list[Workload], servers: Servers, settings: Settings, runs: int,
    progress: Callable[[str], None],
) -> list[tuple[int, str, str]]:
    """Each run, each workload: pvs and its peers back to back, pvs first in odd runs."""
    order: list[tuple[int, str, str]] = []
    for run in range(1, runs + 1):
        for workload in plan:
            tools: list[tuple[str, Tool]] = [("pvs", workload.pvs), *workload.peers.items()]
            if run % 2 == 0:
                tools.reverse()
            for who, tool in tools:
                server_before = servers.cpu_seconds(SERVER_OF[who])
                result = tool()
                result["server_cpu_seconds"] = servers.cpu_seconds(SERVER_OF[who]) - server_before
                _add_cpu_cost(result, workload.unit, settings)
                result["run"] = run
                result["load_average_1min"] = os.getloadavg()[0]
                workload.runs.setdefault(who, []).append(result)
                order.append((run, workload.key, who))
                progress(f"run {run}/{runs} {workload.key:14} {who:12} "
                         f"{result['value']:>12,.0f} {workload.unit}")
    return order


def _add_cpu_cost(result: Measurement, unit: str, settings: Settings) -> None:
    """CPU per unit of work: ms per GiB read (sequential) or µs per request (random).

    The client's CPU covers only the measured part; the server's covers the client's whole
    life, so for random reads the requests of the ramp are estimated as if at the same rate.
    """
    if unit == "MB/s":
        scale, served = 1e3 * (1 << 30), result["bytes"]
        measured = result["bytes"]
    else:
        scale, measured = 1e6, result["ops"]
        served = measured * (settings.ramp + settings.seconds) / result["seconds"]
    if measured:
        result["client_cpu"] = scale * result["cpu_seconds"] / measured
        result["server_cpu"] = scale * result["server_cpu_seconds"] / served


# -- setup ----------------------------------------------------------------------------------


def make_store(work: Path, size: int, environment: dict[str, str]) -> Path:
    """A random image imported as vDisk ``bench``; returns the store's image file, cached."""
    source, store = work / "random.img", work / "store"
    store.mkdir()
    with source.open("wb") as handle:
        for _ in range(size // MIB):
            handle.write(os.urandom(MIB))
    _run([sys.executable, "-m", "pvsd.ctl", "vdisk", "import", str(source), "--name", "bench",
          "--store", str(store)], 600, environment)
    source.unlink()  # pvsd and nbdkit both serve the imported copy: one file, one page cache
    image = store / "bench.img"
    with image.open("rb") as handle, open(os.devnull, "wb") as sink:
        shutil.copyfileobj(handle, sink, MIB)  # `cat IMG > /dev/null`: warm the page cache
    return image


@contextlib.contextmanager
def running_servers(work: Path, image: Path, environment: dict[str, str]) -> Iterator[Servers]:
    servers = Servers(work, image, environment)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


# -- profiling ------------------------------------------------------------------------------


def profile(
    py_spy: str, servers: Servers, settings: Settings, out: Path, rate: int = 250
) -> list[Path]:
    """Record pvsd and the client with py-spy during one seq QD8 and one rand QD32 pass."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, workload, depth in (("seq_qd8", "seq", 8), ("rand_qd32", "rand", 32)):
        server_out, client_out = out / f"{name}.pvsd.txt", out / f"{name}.client.txt"
        # --native names the C code (zlib, memcpy, syscalls); it has to pause the process to
        # sample, so profiled figures run a little slower than the measured ones.
        record = [py_spy, "record", "--format", "raw", "--rate", str(rate), "--native"]
        recorder = subprocess.Popen(
            [*record, "--pid", str(servers.pid("pvsd")), "--duration", "120",
             "-o", str(server_out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # let py-spy attach before the client starts
            pvs_client(servers, settings, workload, depth,
                       wrapper=(*record, "-o", str(client_out), "--"))
        finally:
            recorder.send_signal(2)  # SIGINT to that py-spy only: it writes what it has
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(timeout=10)
        written += [server_out, client_out]
    return written


# -- reporting ------------------------------------------------------------------------------

NOTE = (
    "pvs: pvsd over TCP loopback, measured through the pvs_target client library (uvloop, its "
    "own process); pvs has no NBD export yet. Peers: nbdkit file plugin (one hop) over NBD, "
    "measured with fio --ioengine=nbd and nbdcopy. Same image file, same page cache, "
    "alternating order; medians of {runs} runs (± is half the range). Ratio = pvs / peer."
)


def table_rows(plan: list[Workload]) -> list[list[str]]:
    rows = []
    for workload in plan:
        pvs = workload.median("pvs")
        cells = [workload.label, workload.unit, _cell(workload, "pvs")]
        cells += [_cell(workload, peer) for peer in (PEER_UNIX, PEER_TCP)]
        cells += [f"{pvs / workload.median(peer):.2f}" for peer in (PEER_UNIX, PEER_TCP)]
        rows.append(cells)
    return rows


def _cell(workload: Workload, who: str) -> str:
    return f"{workload.median(who):,.0f} ±{workload.spread(who):.0%}"


HEADERS = ["workload: pvs | peer", "unit", "pvs", PEER_UNIX, PEER_TCP, "pvs/unix", "pvs/TCP"]


CPU_HEADERS = ["workload", "CPU per", "pvsd", "pvs client", "nbdkit TCP", "fio/nbdcopy",
               "pvs/peer"]
CPU_NOTE = (
    "CPU time (user + system) per unit of work, medians: less disturbed by other load than "
    "throughput. Client CPU covers the measured part only; server CPU the client's whole run "
    "(for random reads its ramp is counted at the measured rate). pvs/peer compares the sums."
)


def cpu_rows(plan: list[Workload]) -> list[list[str]]:
    rows = []
    for workload in plan:
        pvs = [workload.cpu("pvs", side) for side in ("server", "client")]
        peer = [workload.cpu(PEER_TCP, side) for side in ("server", "client")]
        unit = "GiB (ms)" if workload.unit == "MB/s" else "request (µs)"
        rows.append([workload.label, unit, *(f"{value:,.0f}" for value in [*pvs, *peer]),
                     f"{sum(pvs) / sum(peer):.1f}"])
    return rows


def print_table(plan: list[Workload], runs: int) -> None:
    tables = [
        ("pvs beside nbdkit, loopback", HEADERS, table_rows(plan), NOTE.format(runs=runs)),
        ("CPU cost, pvs beside nbdkit on TCP", CPU_HEADERS, cpu_rows(plan), CPU_NOTE),
    ]
    print_tables(tables, width=150, left=2)


def revision(tree: Path) -> str:
    """The commit of ``tree`` (with -dirty for a changed work tree), or what the tree says."""
    marker = tree / "REVISION"  # write one into a `git archive` export
    if marker.exists():
        return marker.read_text().strip()
    with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
        command = ["git", "-C", str(tree), "describe", "--always", "--dirty"]
        return _run(command, timeout=10).stdout.strip()
    return "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    for tool in ("fio", "nbdkit", "nbdcopy"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info[tool] = _run([tool, "--version"], timeout=10).stdout.splitlines()[0].strip()
    with contextlib.suppress(ImportError):
        import uvloop

        info["uvloop"] = uvloop.__version__
    return info


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="image size (1G)")
    parser.add_argument("--runs", type=int, default=3, help="runs per workload; median shown")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time of random reads")
    parser.add_argument("--ramp", type=float, default=1.0, help="uncounted warm-up of random reads")
    parser.add_argument("--json", type=Path, help="write every raw run here")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="afterwards, record pvsd and the client with py-spy into DIR")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="benchmark the pvs packages in DIR (e.g. a `git archive` of a "
                        "commit) instead of the installed ones")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 50 or not 0.5 <= args.seconds <= 600:
        parser.error("--runs must be 1..50 and --seconds 0.5..600")
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (the peers need nbdkit, nbdcopy and fio)")
    py_spy = find_py_spy()
    if args.profile and py_spy is None:
        parser.error("--profile needs py-spy: pip install py-spy")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="pvs-bench-", dir=args.workdir) as temporary:
        work = Path(temporary)
        progress(f"making a {args.size / MIB:,.0f} MiB random image in {work}")
        environment = python_environment(args.source)
        image = make_store(work, args.size, environment)
        settings = Settings(args.size, args.seconds, args.ramp, work)
        with running_servers(work, image, environment) as servers:
            progress(f"pvsd at {servers.pvs_address}; nbdkit at {servers.nbd_unix} and "
                     f"{servers.nbd_tcp}")
            plan = workloads(servers, settings)
            order = measure(plan, servers, settings, args.runs, progress)
            profiles: dict[str, Profile] = {}
            if args.profile and py_spy is not None:
                for path in profile(py_spy, servers, settings, args.profile):
                    profiles[path.name.removesuffix(".txt")] = summarize(path)
    print_table(plan, args.runs)
    loads = [r["load_average_1min"] for w in plan for runs in w.runs.values() for r in runs]
    print(f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
          f"on {os.cpu_count()} CPUs (others' work on this machine shows here)")
    print_profiles(profiles)
    if args.json:
        report = {
            "started": started.isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": {"size": args.size, "runs": args.runs, "seconds": args.seconds,
                         "ramp": args.ramp, "source": str(args.source or "installed"),
                         "revision": revision(args.source or HERE.parent)},
            "note": NOTE.format(runs=args.runs),
            "order": order,
            "workloads": [
                {"key": w.key, "label": w.label, "unit": w.unit,
                 "median": {who: w.median(who) for who in w.runs},
                 "cpu_median": {who: {side: w.cpu(who, side) for side in ("server", "client")}
                                for who in w.runs},
                 "ratio": {peer: w.median("pvs") / w.median(peer) for peer in w.peers},
                 "runs": w.runs}
                for w in plan
            ],
            "profile": {name: dataclasses.asdict(p) for name, p in profiles.items()},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"raw runs written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
