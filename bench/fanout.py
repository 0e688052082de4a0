"""Many targets reading at once from one pvsd, beside nbdkit serving as many NBD clients.

    python bench/fanout.py [--size 1G] [--runs 3] [--clients 32] [--processes 4]
                           [--workers 0,2] [--seconds 5] [--ramp 1] [--quick] [--out DIR]

One random image, imported as vDisk ``bench`` and read into the page cache, is served by

- one ``pvsd`` on 127.0.0.11 per value of ``--workers`` (its ``stream_workers`` setting, from a
  config file), each on a store of its own holding a hard link of the image; and
- ``nbdkit -r file IMG`` on a 127.0.0.1 TCP port, with nbdkit's default threads.

``--clients`` readers then read at once for ``--ramp`` uncounted seconds and ``--seconds``
counted ones:

- ``seq``: 1 MiB reads, each client sequentially through a region of its own (the image cut
  in ``--clients`` pieces), wrapping round, ``--depth`` requests in flight per client;
- ``rand``: 4 KiB reads at random offsets over the whole image, one in flight per client.

pvs clients are sessions of the pvs_target client library, each logged in under a device id of
its own and checking every block against the manifest it pinned, as a target does
(``ReadVerifier``; a 4 KiB read therefore fetches a whole manifest block). They are spread over
``--processes`` processes of this script (``client`` mode, uvloop): the machine this was
written on has 2 cores, where 32 Python processes would measure the scheduler, not the
servers. nbdkit's clients are one ``fio --ioengine=nbd --thread --numjobs=CLIENTS``: one NBD
connection per job over TCP loopback.

On a machine with few cores the clients compete with the server for the CPU, so the
aggregate MB/s and IOPS say as much about the clients as about the server; the CPU the server
uses per GiB and per request, read from /proc for the whole process tree (pvsd's workers
included) over the counted window, is the figure that compares servers. Each run measures
every pvsd and nbdkit back to back, in reverse order every other run; the tables show medians.
Every child is started through one registry and ended by its own pid, failure or not.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import json
import logging
import os
import random
import select
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from procs import Child, Children, children, free_port, link_store, start_nbdkit, start_pvsd
from report import print_tables as show_tables
from stream import MIB, _run, machine, make_store, parse_size, python_environment, revision

HERE = Path(__file__).resolve().parent
PVS_HOST = "127.0.0.11"
BLOCK = 4096
GIB = 1 << 30
NBDKIT = "nbdkit"
WORKLOADS = {"seq": "MB/s", "rand": "IOPS"}

Measurement = dict[str, Any]


# -- client mode: some of the pvs sessions, in one process ---------------------------------------


def client_main(argv: list[str]) -> int:
    """Log every session in, print ``{"ready": N}``, wait for ``go`` on stdin, read, print
    the counts as one JSON line."""
    import structlog

    from pvs_target.loop import run

    parser = argparse.ArgumentParser(prog="fanout.py client")
    parser.add_argument("--server", required=True)
    parser.add_argument("--first", type=int, required=True, help="index of the first session")
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True, help="sessions of all processes")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--ramp", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = run(_client(args))
    print(json.dumps(result), flush=True)
    return 0


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    from pvs_target.client import Session, login
    from pvs_target.verify import ReadVerifier

    async def log_in(index: int) -> Session:
        deadline = time.monotonic() + 60
        while True:
            try:
                return await login([args.server], "bench", f"fanout-{index}")
            except Exception as error:  # IDENTITY_PENDING while pvsd hashes a fresh image
                if time.monotonic() >= deadline or not getattr(error, "retryable", False):
                    raise
                await asyncio.sleep(0.2)

    indexes = range(args.first, args.first + args.sessions)
    sessions = list(await asyncio.gather(*(log_in(index) for index in indexes)))
    try:
        print(json.dumps({"ready": len(sessions)}), flush=True)
        if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
            raise RuntimeError("told to stop before reading")
        loop = asyncio.get_running_loop()
        count_from = loop.time() + args.ramp
        stop_at = count_from + args.seconds
        counted = {"ops": 0, "bytes": 0}
        length = MIB if args.workload == "seq" else BLOCK

        async def reader(session: Session, verifier: ReadVerifier | None,
                         offsets: Iterator[int]) -> None:
            connection = session.connection
            while loop.time() < stop_at:
                offset = next(offsets)
                if verifier is None:
                    data = await connection.read(offset, length)
                else:
                    data = await verifier.read(connection, offset, length)
                if len(data) != length:
                    raise RuntimeError(f"read {len(data)} of {length} bytes at {offset}")
                if count_from <= loop.time() <= stop_at:
                    counted["ops"] += 1
                    counted["bytes"] += length

        async def clock() -> float:
            await asyncio.sleep(max(0.0, count_from - loop.time()))
            begun = time.process_time()
            await asyncio.sleep(max(0.0, stop_at - loop.time()))
            return time.process_time() - begun

        async with asyncio.TaskGroup() as group:
            timer = group.create_task(clock())
            for index, session in zip(indexes, sessions, strict=True):
                verifier = None if args.no_verify else ReadVerifier(session.identity)
                offsets = _offsets(args.workload, session.size, index, args.clients, index)
                for _ in range(args.depth):
                    group.create_task(reader(session, verifier, offsets))
    finally:
        await asyncio.gather(*(session.close() for session in sessions),
                             return_exceptions=True)
    return {**counted, "seconds": args.seconds, "cpu_seconds": timer.result(),
            "sessions": len(sessions), "verified": not args.no_verify}


def _offsets(workload: str, size: int, index: int, clients: int, seed: int) -> Iterator[int]:
    """Where one client reads: its own region, in order and round again (``seq``), or
    anywhere at random (``rand``); the requests in flight of one client share it."""
    if workload == "rand":
        rng = random.Random(seed)
        blocks = size // BLOCK
        return (rng.randrange(blocks) * BLOCK for _ in itertools.count())
    region = max(MIB, size // clients // MIB * MIB)
    base = index * region % size
    return ((base + step * MIB % region) % size for step in itertools.count())


# -- the servers --------------------------------------------------------------------------------


def knows_stream_workers(environment: dict[str, str]) -> bool:
    """Whether this tree's pvsd accepts ``stream_workers`` (an older one refuses the key)."""
    check = "from pvsd.config import KNOWN_SETTINGS; print('stream_workers' in KNOWN_SETTINGS)"
    command = [sys.executable, "-P", "-c", check]  # -P: not the packages in the cwd
    return _run(command, 30, environment).stdout.strip() == "True"


@dataclasses.dataclass(frozen=True)
class Server:
    child: Child
    address: str
    """HOST:PORT of a pvsd, an NBD URI for nbdkit."""


def start_servers(
    registry: Children, work: Path, image: Path, workers: list[int], with_key: bool
) -> dict[str, Server]:
    """One pvsd per workers value (named ``pvs wN``) and nbdkit; every hard link is made
    before the first pvsd starts, since a new link makes a running pvsd hash the image again."""
    stores = {count: link_store(image, work / f"store-w{count}") for count in workers}
    servers: dict[str, Server] = {}
    for count in workers:
        extra: list[str] = []
        if with_key:
            config = work / f"pvsd-w{count}.toml"
            config.write_text(f"stream_workers = {count}\n")
            extra = ["--config", str(config)]
        address = f"{PVS_HOST}:{free_port(PVS_HOST)}"
        pvsd = start_pvsd(registry, f"pvsd-w{count}", address, stores[count], extra)
        servers[f"pvs w{count}"] = Server(pvsd, address)
    port = free_port("127.0.0.1", span=1)
    nbdkit = start_nbdkit(registry, "nbdkit", ["-p", str(port), "-i", "127.0.0.1"],
                          ["file", str(image)], work)
    servers[NBDKIT] = Server(nbdkit, f"nbd://127.0.0.1:{port}")
    return servers


# -- one measurement ----------------------------------------------------------------------------


class Options:
    def __init__(self, args: argparse.Namespace, size: int, seconds: float) -> None:
        self.size, self.seconds, self.ramp = size, seconds, args.ramp
        self.clients, self.processes, self.depth = args.clients, args.processes, args.depth
        self.verify = not args.no_verify


def _window(
    started: float, options: Options, sample: Callable[[], tuple[float, float]]
) -> dict[str, float]:
    """Server and client CPU over the middle of the counted time, as cores busy: the clients
    start counting ``ramp`` after ``started`` and stop ``seconds`` later."""
    margin = min(0.25, options.seconds / 10)
    begin, end = started + options.ramp + margin, started + options.ramp + options.seconds - margin
    time.sleep(max(0.0, begin - time.monotonic()))
    first, at_first = sample(), time.monotonic()
    time.sleep(max(0.0, end - time.monotonic()))
    last, at_last = sample(), time.monotonic()
    span = at_last - at_first
    return {"server_cores": (last[0] - first[0]) / span,
            "client_cores": (last[1] - first[1]) / span, "window_seconds": span}


def measure_pvs(
    registry: Children, server: Server, options: Options, workload: str
) -> Measurement:
    share, extra = divmod(options.clients, options.processes)
    clients: list[Child] = []
    try:
        first = 0
        for number in range(options.processes):
            sessions = share + (number < extra)
            command = [
                sys.executable, str(HERE / "fanout.py"), "client",
                "--server", server.address,
                "--first", str(first), "--sessions", str(sessions),
                "--clients", str(options.clients), "--workload", workload,
                "--depth", str(options.depth if workload == "seq" else 1),
                "--ramp", str(options.ramp), "--seconds", str(options.seconds),
            ]
            if not options.verify:
                command.append("--no-verify")
            clients.append(registry.start(f"client{number}", command, pipes=True))
            first += sessions
        for child in clients:
            ready = json.loads(_line(child, 120))
            if ready.get("ready") is None:
                raise RuntimeError(f"{child.name} said {ready} instead of ready")
        for child in clients:
            assert child.process.stdin is not None
            child.process.stdin.write("go\n")
            child.process.stdin.flush()
        started = time.monotonic()

        def sample() -> tuple[float, float]:
            return (server.child.tree_cpu_seconds(),
                    sum(child.tree_cpu_seconds() for child in clients))

        cores = _window(started, options, sample)
        results = [json.loads(_line(child, options.seconds + 120)) for child in clients]
        for child in clients:
            if child.process.wait(timeout=60) != 0:
                raise RuntimeError(f"{child.name} failed: {child.log_text()[-2000:]}")
    finally:
        for child in clients:
            registry.stop(child)
    ops, read = sum(r["ops"] for r in results), sum(r["bytes"] for r in results)
    return {"tool": "pvs_target library", "ops": ops, "bytes": read,
            "seconds": options.seconds, "mb_s": read / options.seconds / 1e6,
            "iops": ops / options.seconds,
            "client_cpu_seconds": sum(r["cpu_seconds"] for r in results),
            "verified": options.verify, **cores}


def measure_nbdkit(
    registry: Children, server: Server, options: Options, workload: str, work: Path
) -> Measurement:
    output = work / "fio.json"
    output.unlink(missing_ok=True)
    command = [
        "fio", "--name=fanout", "--ioengine=nbd",
        f"--uri={server.address}",
        "--thread", f"--numjobs={options.clients}", "--group_reporting",
        "--time_based", f"--runtime={options.seconds:g}", f"--ramp_time={options.ramp:g}",
        "--output-format=json", f"--output={output}",
    ]
    if workload == "seq":
        region = max(MIB, options.size // options.clients // MIB * MIB)
        command += ["--rw=read", "--bs=1M", f"--iodepth={options.depth}", f"--size={region}",
                    f"--offset_increment={region}"]
    else:
        command += ["--rw=randread", "--bs=4k", "--iodepth=1", f"--size={options.size}",
                    "--norandommap", "--randrepeat=0"]
    fio = registry.start("fio", command)
    try:
        started = time.monotonic()
        cores = _window(started, options,
                        lambda: (server.child.tree_cpu_seconds(), fio.tree_cpu_seconds()))
        code = fio.process.wait(timeout=options.ramp + options.seconds + 120)
        if code != 0:
            raise RuntimeError(f"fio failed ({code}): {fio.log_text()[-2000:]}")
    finally:
        registry.stop(fio)
    text = output.read_text()  # fio's nbd engine writes "connected to NBD server" lines first
    job = json.loads(text[text.index("{"):])["jobs"][0]
    read = job["read"]
    if job["error"] or not read["io_bytes"]:
        raise RuntimeError(f"fio read nothing (error {job['error']})")
    seconds = read["runtime"] / 1e3
    return {"tool": "fio --ioengine=nbd", "ops": read["total_ios"], "bytes": read["io_bytes"],
            "seconds": seconds, "mb_s": read["bw_bytes"] / 1e6, "iops": read["iops"],
            **cores}  # not fio's usr_cpu/sys_cpu: with --thread they count next to nothing


def _line(child: Child, timeout: float) -> str:
    """The next line ``child`` prints, within ``timeout`` seconds."""
    stdout = child.process.stdout
    assert stdout is not None
    ready, _, _ = select.select([stdout], [], [], timeout)
    line = stdout.readline() if ready else ""
    if not line:
        code = child.process.poll()
        why = f"exited with {code}" if code is not None else f"printed nothing in {timeout:g} s"
        raise RuntimeError(f"{child.name} {why}: {child.log_text()[-2000:]}")
    return str(line)


def cost(result: Measurement, workload: str) -> None:
    """CPU per unit of work from cores busy and the rate: ms per GiB or µs per request."""
    if workload == "seq":
        rate, scale = result["bytes"] / result["seconds"] / GIB, 1e3
    else:
        rate, scale = result["ops"] / result["seconds"], 1e6
    result["value"] = result["mb_s"] if workload == "seq" else result["iops"]
    for side in ("server", "client"):
        result[f"{side}_cpu"] = scale * result[f"{side}_cores"] / rate if rate else float("nan")


# -- the run ------------------------------------------------------------------------------------


def measure_all(
    registry: Children, servers: dict[str, Server], options: Options, runs: int, work: Path,
    progress: Callable[[str], None],
) -> dict[str, dict[str, list[Measurement]]]:
    results: dict[str, dict[str, list[Measurement]]] = {
        workload: {party: [] for party in servers} for workload in WORKLOADS
    }
    for run in range(1, runs + 1):
        for workload, unit in WORKLOADS.items():
            parties = list(servers) if run % 2 else list(reversed(servers))
            for party in parties:
                server = servers[party]
                if party == NBDKIT:
                    result = measure_nbdkit(registry, server, options, workload, work)
                else:
                    result = measure_pvs(registry, server, options, workload)
                cost(result, workload)
                result["run"] = run
                result["load_average_1min"] = os.getloadavg()[0]
                results[workload][party].append(result)
                per = "ms/GiB" if workload == "seq" else "µs/req"
                progress(f"run {run}/{runs} {workload:4} {party:8} {result['value']:>9,.0f} "
                         f"{unit}, server {result['server_cpu']:,.1f} {per} "
                         f"({result['server_cores']:.2f} cores), client "
                         f"{result['client_cpu']:,.1f} {per}")
    return results


def summarize(results: dict[str, dict[str, list[Measurement]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for workload, parties in results.items():
        rows: dict[str, Any] = {}
        for party, runs in parties.items():
            values = [run["value"] for run in runs]
            middle = statistics.median(values)
            rows[party] = {
                "value": middle,
                "spread": (max(values) - min(values)) / 2 / middle if middle else 0.0,
                **{key: statistics.median(run[key] for run in runs)
                   for key in ("server_cpu", "client_cpu", "server_cores", "client_cores")},
            }
        for party, row in rows.items():
            if party != NBDKIT:
                row["ratio"] = row["value"] / rows[NBDKIT]["value"]
                row["server_cpu_ratio"] = row["server_cpu"] / rows[NBDKIT]["server_cpu"]
        summary[workload] = rows
    return summary


def print_tables(summary: dict[str, Any], options: Options, runs: int, footer: str) -> None:
    parties = list(summary["seq"])
    pvs = [party for party in parties if party != NBDKIT]
    rate_rows, cpu_rows = [], []
    for workload, unit in WORKLOADS.items():
        rows = summary[workload]
        label = (f"seq 1M QD{options.depth}/client" if workload == "seq"
                 else "rand 4k QD1/client")
        rate_rows.append([label, unit, *(f"{rows[p]['value']:,.0f} ±{rows[p]['spread']:.0%}"
                                         for p in parties),
                          *(f"{rows[p]['ratio']:.2f}" for p in pvs)])
        per, digits = ("ms/GiB", 0) if workload == "seq" else ("µs/req", 1)
        cpu_rows.append([label, per,
                         *(f"{rows[p]['server_cpu']:,.{digits}f} ({rows[p]['server_cores']:.2f})"
                           for p in parties),
                         *(f"{rows[p]['client_cpu']:,.{digits}f}" for p in parties),
                         *(f"{rows[p]['server_cpu_ratio']:.2f}" for p in pvs)])
    clients = f"{options.clients} clients"
    tables = [
        (f"{clients} reading at once, aggregate (ratio = pvs / nbdkit)",
         ["workload", "unit", *parties, *(f"{p} / nbdkit" for p in pvs)], rate_rows,
         f"Medians of {runs} alternating runs (± half the range). pvs: {options.clients} "
         f"sessions of the pvs_target library in {options.processes} processes, "
         f"{'every block verified' if options.verify else 'no verification'}; nbdkit: fio "
         f"--ioengine=nbd, {options.clients} connections over TCP."),
        ("Server CPU per unit of work (cores busy), client CPU per unit of work",
         ["workload", "per", *(f"{p} server" for p in parties),
          *(f"{p} client" for p in parties), *(f"{p} / nbdkit server" for p in pvs)],
         cpu_rows,
         "CPU (user + system) of the whole server process tree and of the clients, from /proc, "
         "over the counted window; cores = CPU seconds per second."),
    ]
    show_tables(tables, footer)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, help="image size (1G; --quick: 64M)")
    parser.add_argument("--runs", type=int, help="runs of each measurement; medians (3; quick 1)")
    parser.add_argument("--seconds", type=float, help="counted seconds per measurement (5; "
                        "quick 2)")
    parser.add_argument("--ramp", type=float, default=1.0, help="uncounted warm-up (1)")
    parser.add_argument("--clients", type=int, default=32, help="readers at once (32)")
    parser.add_argument("--processes", type=int, default=4,
                        help="processes the pvs sessions are spread over (4)")
    parser.add_argument("--depth", type=int, default=1, help="seq requests in flight per client")
    parser.add_argument("--workers", default="0,2",
                        help="pvsd stream_workers values, comma-separated: one pvsd each (0,2)")
    parser.add_argument("--no-verify", action="store_true",
                        help="pvs clients skip the manifest check (a target never does)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64M, 1 run, 2 s")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="where the JSON goes (bench/results)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="benchmark the pvs packages in DIR instead of the work tree's")
    args = parser.parse_args(argv)
    size = args.size or (64 * MIB if args.quick else GIB)
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    try:
        workers = sorted({int(item) for item in args.workers.split(",")})
    except ValueError:
        parser.error("--workers takes whole numbers separated by commas, e.g. 0,2")
    if not 1 <= runs <= 20 or not 1 <= seconds <= 120 or not 0 <= args.ramp <= 30:
        parser.error("--runs must be 1..20, --seconds 1..120 and --ramp 0..30")
    if not 1 <= args.processes <= args.clients <= 1024 or not 1 <= args.depth <= 64:
        parser.error("need 1 <= --processes <= --clients <= 1024 and --depth 1..64")
    if any(count < 0 for count in workers):
        parser.error("--workers values must be 0 or more")
    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: nbdkit, fio)")

    def progress(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.UTC)
    tree = args.source or HERE.parent
    commit = revision(tree)
    environment = python_environment(args.source)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(tree.resolve()), environment.get("PYTHONPATH", "")])
    )
    with_key = knows_stream_workers(environment)
    skipped = [] if with_key else [count for count in workers if count]
    if skipped:
        progress(f"this pvsd does not know stream_workers yet: workers {skipped} left out")
        workers = [0]
    options = Options(args, size, seconds)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "revision": commit,
        "machine": machine(),
        "settings": {"size": size, "runs": runs, "seconds": seconds, "ramp": args.ramp,
                     "clients": args.clients, "processes": args.processes,
                     "seq_depth": args.depth, "workers": workers, "workers_skipped": skipped,
                     "verify": options.verify, "quick": args.quick,
                     "source": str(args.source or "work tree")},
        "load_average": {"start": os.getloadavg()},
    }
    work = Path(tempfile.mkdtemp(prefix="pvs-fanout-", dir=args.workdir))
    (work / "logs").mkdir()
    out = args.out.resolve()
    failed = True
    try:
        progress(f"making a {size / MIB:,.0f} MiB random image in {work}")
        image = make_store(work, size, environment)
        with children(work / "logs", environment) as registry:
            servers = start_servers(registry, work, image, workers, with_key)
            progress("up: " + ", ".join(
f"{name} at {server.address}" for name, server in servers.items()))
            report["runs"] = measure_all(registry, servers, options, runs, work, progress)
        failed = False
    finally:
        if args.keep or failed:
            progress(f"kept {work} (logs in {work / 'logs'})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average"]["end"] = os.getloadavg()
    report["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report["summary"] = summary = summarize(report["runs"])
    loads = [r["load_average_1min"] for w in report["runs"].values() for p in w.values()
             for r in p]
    footer = (f"commit {commit}, started {report['started']}; 1-minute load average "
              f"{report['load_average']['start'][0]:.1f} at start, {min(loads):.1f}-"
              f"{max(loads):.1f} during, on {os.cpu_count()} CPUs")
    print_tables(summary, options, runs, footer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fanout-{started:%Y-%m-%d-%H%M}-{commit.split('-dirty')[0]}.json"
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
