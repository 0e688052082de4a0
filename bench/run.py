"""The issue-7 benchmark: pvs through its NBD export beside nbdkit, failover, boot storm, idle.

    python bench/run.py [--size 1G] [--runs 3] [--seconds 5] [--quick] [--out bench/results]

1. Streaming. One random image, imported as vDisk ``bench`` and read into the page cache, is
   served three ways over loopback, all exported as NBD on a unix socket and read by the same
   clients (nbdcopy, fio ``--ioengine=nbd``):
   - pvs: ``pvsd`` on 127.0.0.11 and ``pvs-target attach --nbd unix:SOCK`` in front of it;
   - nbdkit, one hop: ``nbdkit -f -r -U SOCK file IMG``;
   - nbdkit, two hops (pvs's shape): ``nbdkit -f -r -U SOCK nbd hostname=127.0.0.1 port=P``
     in front of ``nbdkit -f -r -p P -i 127.0.0.1 file IMG``.
   Each run measures every workload on all three back to back, pvs first in odd runs and last
   in even ones; the table shows medians and pvs/peer ratios (against two hops: the headline).
2. Failover: a 3-server site, ``pvs-target attach`` with default settings, fio reading through
   the export while the streaming server stops its stream service, then is killed.
3. Boot storm: many targets log in at once to the site (powers 1, 1, 2) and read 4 KiB.
4. Idle sessions: many targets hold a session to one pvsd, sending nothing.

The results go to ``--out`` as ``bench-DATE-HASH.json`` (every raw run) and ``.png`` (a chart);
the previous JSON there, if any, is shown beside. With ``--profile auto`` (the default), each
streaming workload that misses its target is run once more under py-spy (pvsd and pvs-target).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from procs import (
    Child,
    Children,
    children,
    free_port,
    link_store,
    start_attach,
    start_nbdkit,
    start_pvsd,
)
from profile_summary import find_py_spy, summarize
from report import Spec, evaluate, find_previous, print_report, save
from scenarios import boot_storm, failover_run, idle_sessions
from stream import (
    MIB,
    Measurement,
    Settings,
    fio,
    machine,
    make_store,
    nbdcopy,
    parse_size,
    python_environment,
    revision,
)

HERE = Path(__file__).resolve().parent
PVS, ONE_HOP, TWO_HOPS = "pvs", "nbdkit 1 hop", "nbdkit 2 hops"
PARTIES = (PVS, ONE_HOP, TWO_HOPS)
PVS_HOST = "127.0.0.11"

SPECS = (
    Spec("copy", "whole disk: nbdcopy to null:", "MB/s", "copy", 0, 1.0),
    Spec("seq_qd1", "seq 1M QD1: fio", "MB/s", "seq", 1, None),
    Spec("seq_qd8", "seq 1M QD8: fio", "MB/s", "seq", 8, 1.0),
    Spec("rand_qd1", "rand 4k QD1: fio", "IOPS", "rand", 1, 0.8),
    Spec("rand_qd32", "rand 4k QD32: fio", "IOPS", "rand", 32, 1.0),
)


# -- streaming: pvs beside nbdkit ---------------------------------------------------------------


class Streaming:
    """pvsd + pvs-target, nbdkit (one hop) and nbdkit -> nbdkit (two hops), one image."""

    def __init__(self, registry: Children, work: Path, store: Path, image: Path) -> None:
        self.work = work
        port = free_port(PVS_HOST)
        pvsd = start_pvsd(registry, "pvsd", f"{PVS_HOST}:{port}", store)
        target = start_attach(registry, "pvs-target", [f"{PVS_HOST}:{port}"],
                              work / "pvs.sock", work / "pvs-control.sock", "bench-stream")
        one = start_nbdkit(registry, "nbdkit-1hop", ["-U", str(work / "nbdkit1.sock")],
                           ["file", str(image)], work)
        back_port = free_port("127.0.0.1", span=1)
        back = start_nbdkit(registry, "nbdkit-2hop-back",
                            ["-p", str(back_port), "-i", "127.0.0.1"], ["file", str(image)], work)
        front = start_nbdkit(registry, "nbdkit-2hop-front", ["-U", str(work / "nbdkit2.sock")],
                             ["nbd", "hostname=127.0.0.1", f"port={back_port}"], work)
        self.chains: dict[str, list[Child]] = {
            PVS: [pvsd, target], ONE_HOP: [one], TWO_HOPS: [front, back],
        }
        self.uris = {
            PVS: f"nbd+unix:///?socket={work / 'pvs.sock'}",
            ONE_HOP: f"nbd+unix:///?socket={work / 'nbdkit1.sock'}",
            TWO_HOPS: f"nbd+unix:///?socket={work / 'nbdkit2.sock'}",
        }

    def cpu(self, party: str) -> float:
        return sum(child.cpu_seconds() for child in self.chains[party])

    def measure(self, spec: Spec, party: str, settings: Settings) -> Measurement:
        before = self.cpu(party)
        uri = self.uris[party]
        if spec.workload == "copy":
            result = nbdcopy(uri, settings)
        else:
            result = fio(uri, settings, spec.workload, spec.depth, timed=True)
        result["server_cpu_seconds"] = self.cpu(party) - before
        # CPU per unit of work: ms per GiB, or µs per request. fio's figures cover the
        # measured part; the servers' cover the ramp as well, counted at the measured rate.
        counted = result["seconds"]
        served = counted if spec.workload == "copy" else counted + settings.ramp
        work_done = result["bytes"] / (1 << 30) if spec.unit == "MB/s" else result["ops"]
        scale = 1e3 if spec.unit == "MB/s" else 1e6
        if work_done:
            result["client_cpu"] = scale * result["cpu_seconds"] / work_done
            result["server_cpu"] = scale * result["server_cpu_seconds"] * counted / served \
                / work_done
        result["load_average_1min"] = os.getloadavg()[0]
        return result


def measure_streaming(
    streaming: Streaming, settings: Settings, runs: int, progress: Callable[[str], None]
) -> dict[str, dict[str, list[Measurement]]]:
    results: dict[str, dict[str, list[Measurement]]] = {
        spec.key: {party: [] for party in PARTIES} for spec in SPECS
    }
    for run in range(1, runs + 1):
        for spec in SPECS:
            order = list(PARTIES) if run % 2 else list(reversed(PARTIES))
            for party in order:
                result = streaming.measure(spec, party, settings)
                result["run"] = run
                results[spec.key][party].append(result)
                progress(f"run {run}/{runs} {spec.key:10} {party:14} "
                         f"{result['value']:>12,.0f} {spec.unit}")
    return results


def profile_pvs(
    py_spy: str, streaming: Streaming, spec: Spec, settings: Settings, out: Path,
    rate: int = 250,
) -> dict[str, Any]:
    """One more pvs pass of ``spec`` with py-spy recording pvsd and pvs-target (``--native``:
    C frames too; it pauses the process to sample, so this pass runs a little slower)."""
    out.mkdir(parents=True, exist_ok=True)
    recorders: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for child in streaming.chains[PVS]:
            path = out / f"{spec.key}.{child.name}.txt"
            recorder = subprocess.Popen(
                [py_spy, "record", "--format", "raw", "--rate", str(rate), "--native",
                 "--pid", str(child.pid), "--duration", "300", "-o", str(path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            recorders.append((recorder, path))
        time.sleep(1.0)  # let py-spy attach
        values = []
        begun = time.monotonic()
        while len(values) < 20 and (not values or time.monotonic() - begun < settings.seconds):
            values.append(streaming.measure(spec, PVS, settings)["value"])  # nbdcopy: again
    finally:
        for recorder, _ in recorders:
            if recorder.poll() is None:
                recorder.send_signal(signal.SIGINT)  # to that py-spy only: it writes its file
        for recorder, _ in recorders:
            try:
                recorder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(timeout=10)
    profiles = {}
    for _, path in recorders:
        if path.exists() and path.stat().st_size:
            profiles[path.stem] = dataclasses.asdict(summarize(path))
    return {"value_under_profiler": statistics.median(values),
            "files": [str(p) for _, p in recorders], "profiles": profiles}


# -- the whole run ------------------------------------------------------------------------------


def phase(
    report: dict[str, Any], key: str, progress: Callable[[str], None],
    work: Callable[[], Any],
) -> None:
    """Run one part; if it fails (the tree may be mid-change), record why and go on."""
    begun = time.monotonic()
    try:
        report[key] = work()
    except Exception as error:
        progress(f"{key} failed: {error}")
        report.setdefault("errors", {})[key] = "".join(
            traceback.format_exception_only(error)
        ).strip()[-3000:]
    report.setdefault("phase_seconds", {})[key] = round(time.monotonic() - begun, 1)
    report["load_average"][key] = os.getloadavg()  # at the end of the part: 1, 5, 15 min


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, help="image size (1G; --quick: 256M)")
    parser.add_argument("--runs", type=int, help="runs of each measurement; medians (3; quick 1)")
    parser.add_argument("--seconds", type=float, help="counted seconds per fio run (5; quick 2)")
    parser.add_argument("--ramp", type=float, default=1.0, help="uncounted fio warm-up (1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 256M, 1 run, 2 s, boot storm 100, idle 200")
    parser.add_argument("--storm", type=int, help="boot storm targets (500; quick 100)")
    parser.add_argument("--idle", type=int, help="idle sessions on one pvsd (1000; quick 200)")
    parser.add_argument("--idle-seconds", type=float, help="how long they stay idle (20; quick 5)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="where the JSON and the chart go (bench/results)")
    parser.add_argument("--profile", choices=["auto", "all", "off"], default="auto",
                        help="py-spy pvsd and pvs-target under the workloads that miss their "
                        "target (auto), every workload (all), or none")
    parser.add_argument("--only", action="append",
                        choices=["streaming", "failover", "storm", "idle"],
                        help="run only this part (repeatable)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--source", type=Path, metavar="DIR",
                        help="benchmark the pvs packages in DIR (e.g. a `git archive` of a "
                        "commit) instead of the work tree's")
    args = parser.parse_args(argv)
    quick = args.quick
    size = args.size or (256 * MIB if quick else 1 << 30)
    runs = args.runs or (1 if quick else 3)
    seconds = args.seconds or (2.0 if quick else 5.0)
    storm = args.storm or (100 if quick else 500)
    idle = args.idle or (200 if quick else 1000)
    idle_seconds = args.idle_seconds or (5.0 if quick else 20.0)
    if not 1 <= runs <= 20 or not 0.5 <= seconds <= 120 or not 1 <= idle_seconds <= 50:
        parser.error("--runs must be 1..20, --seconds 0.5..120 and --idle-seconds 1..50 "
                     "(below pvsd's 60 s idle timeout)")
    if not 3 <= storm <= 2000 or not 1 <= idle <= 4000:
        parser.error("--storm must be 3..2000 and --idle 1..4000")
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: nbdkit, libnbd-bin, fio)")
    py_spy = find_py_spy() if args.profile != "off" else None
    parts = set(args.only or ["streaming", "failover", "storm", "idle"])

    def progress(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.UTC)
    tree = args.source or HERE.parent
    commit = revision(tree)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "revision": commit,
        "machine": machine(),
        "settings": {"size": size, "runs": runs, "seconds": seconds, "ramp": args.ramp,
                     "quick": quick, "storm": storm, "idle": idle, "idle_seconds": idle_seconds,
                     "source": str(args.source or "work tree"), "parts": sorted(parts)},
        "load_average": {"start": os.getloadavg()},
        "specs": [dataclasses.asdict(spec) for spec in SPECS],
        "parties": list(PARTIES),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{started:%Y-%m-%d-%H%M}-{commit.split('-dirty')[0]}"
    environment = python_environment(args.source)
    environment["PYTHONPATH"] = os.pathsep.join(  # the tree's packages, also from bench/
        filter(None, [str(tree.resolve()), environment.get("PYTHONPATH", "")])
    )
    work = Path(tempfile.mkdtemp(prefix="pvs-bench-", dir=args.workdir))
    (work / "logs").mkdir()
    try:
        progress(f"making a {size / MIB:,.0f} MiB random image in {work}")
        image = make_store(work, size, environment)
        # every hard link first: a new link changes the image's ctime, which a running pvsd
        # would take for a changed image
        site_stores = [link_store(image, work / f"site-store{n}") for n in (1, 2, 3)]
        idle_store = link_store(image, work / "idle-store")
        settings = Settings(size, seconds, args.ramp, work)
        with children(work / "logs", environment) as registry:
            if "streaming" in parts:
                phase(report, "streaming", progress,
                      lambda: streaming_part(registry, work, image, settings, runs, py_spy,
                                             args.profile, args.out / f"{stem}-profiles",
                                             progress))
            if "failover" in parts:
                phase(report, "failover", progress, lambda: [
                    failover_run(registry, work / f"failover{n}", site_stores, size,
                                 progress=progress)
                    for n in range(1, runs + 1)
                ])
            if "storm" in parts:
                phase(report, "storm", progress, lambda: [
                    boot_storm(registry, work / f"storm{n}", site_stores, storm,
                               progress=progress)
                    for n in range(1, runs + 1)
                ])
            if "idle" in parts:
                phase(report, "idle", progress, lambda: [
                    idle_sessions(registry, work / f"idle{n}", idle_store, idle, idle_seconds,
                                  processes=4 if idle > 400 else 2, progress=progress)
                    for n in range(1, runs + 1)
                ])
    finally:
        if args.keep or report.get("errors"):
            progress(f"kept {work} (logs in {work / 'logs'})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average"]["end"] = os.getloadavg()
    report["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    evaluate(report)
    previous = find_previous(args.out, stem, report["settings"])
    print_report(report, previous)
    paths = save(report, previous, args.out, stem)
    progress("wrote " + ", ".join(str(path) for path in paths))
    return 1 if report.get("errors") else 0


def streaming_part(
    registry: Children, work: Path, image: Path, settings: Settings, runs: int,
    py_spy: str | None, profile: str, profile_dir: Path, progress: Callable[[str], None],
) -> dict[str, Any]:
    streaming = Streaming(registry, work, image.parent, image)
    try:
        progress("pvs (pvsd + pvs-target), nbdkit one hop and nbdkit two hops are up")
        results = measure_streaming(streaming, settings, runs, progress)
        part: dict[str, Any] = {"runs": results}
        if py_spy is not None:
            profiles = {}
            for spec in SPECS:
                medians = {p: statistics.median(r["value"] for r in results[spec.key][p])
                           for p in PARTIES}
                ratio = medians[PVS] / medians[TWO_HOPS]
                missed = spec.target is not None and ratio < spec.target
                if profile == "all" or missed:
                    progress(f"profiling pvs under {spec.key} (pvs/two hops {ratio:.2f})")
                    with contextlib.suppress(OSError, subprocess.SubprocessError):
                        profiles[spec.key] = profile_pvs(py_spy, streaming, spec, settings,
                                                         profile_dir)
            part["profiles"] = profiles
        return part
    finally:
        for chain in streaming.chains.values():
            for child in chain:
                registry.stop(child)


if __name__ == "__main__":
    sys.exit(main())
