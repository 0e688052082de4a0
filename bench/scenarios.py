"""The site scenarios of ``bench/run.py``: failover under load, boot storm, idle sessions.

Each scenario starts its own servers through a `procs.Children` registry, which ends them by
pid whatever happens; every wait and every load loop is bounded in time and count.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from procs import (
    Child,
    Children,
    Site,
    free_port,
    start_attach,
    start_pvsd,
    target_status,
    until,
)

HERE = Path(__file__).resolve().parent
SITE_HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
IDLE_HOST = "127.0.0.31"
POWERS = (1.0, 1.0, 2.0)


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(share * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- failover under load --------------------------------------------------------------------------


FIO_JOBS = """[global]
ioengine=nbd
uri={uri}
time_based=1
runtime={runtime}
size={size}
continue_on_error=all
log_avg_msec=0
log_unix_epoch=1

[rand4k_qd8]
rw=randread
bs=4k
iodepth=8
norandommap=1
randrepeat=0
write_lat_log={logs}/rand4k_qd8

[seq1m_qd1]
rw=read
bs=1M
iodepth=1
write_lat_log={logs}/seq1m_qd1
"""


def failover_run(
    registry: Children, work: Path, stores: Sequence[Path], size: int, *, lead: float = 3.0,
    gap: float = 8.0, window: float = 5.0, progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A 3-server site, ``pvs-target attach`` (default settings) exporting NBD, and fio
    reading through the export (4 KiB random QD8 plus 1 MiB sequential QD1, every read's
    latency logged) while the streaming server (a) stops its stream service and (b) is killed.

    For each event: every read that completed in ``[event, event + window]``, its longest and
    99th-percentile completion latency; the target's own ``longest_wait_ms`` for that failover.
    """
    work.mkdir(parents=True)
    site = Site(registry, work, stores, POWERS, SITE_HOSTS, label="failover")
    site.start()
    nbd, control = work / "nbd.sock", work / "control.sock"
    environment = registry.environment
    target = start_attach(registry, "failover-target", list(site.addresses.values()), nbd,
                          control, "bench-failover")
    runtime = lead + 2 * gap
    (work / "logs").mkdir()
    jobs = work / "load.fio"
    jobs.write_text(FIO_JOBS.format(uri=f"nbd+unix:///?socket={nbd}", runtime=f"{runtime:g}",
                                    size=size, logs=work / "logs"))
    output = work / "fio.json"
    with (work / "fio.stderr").open("wb") as errors:  # with continue_on_error, fio says a lot
        fio = subprocess.Popen(
            ["fio", "--output-format=json", f"--output={output}", str(jobs)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
        )
    events: list[dict[str, Any]] = []
    try:
        started = time.time()
        time.sleep(lead)
        for kind in ("planned", "crash"):
            if fio.poll() is not None:
                raise RuntimeError(f"fio ended early with exit code {fio.returncode}")
            before = _serving(target_status(control, environment))
            event: dict[str, Any] = {"kind": kind, "server": before, "at": time.time()}
            if kind == "planned":  # through another server's admin API, as an admin would
                via = next(name for name in site.names if name != before)
                begun = time.monotonic()
                site.pvsctl("stop-stream", before, via=via)
                event["command_seconds"] = time.monotonic() - begun
                event["how"] = f"pvsctl --admin {site.admins[via]} stop-stream {before}"
            else:
                site.servers[before].kill()  # SIGKILL to our own child, by its pid
                event["how"] = f"SIGKILL {before} (pid {site.servers[before].pid})"

            def moved(server: str = before) -> bool:
                status = target_status(control, environment)
                return status["state"] == "streaming" and _serving(status) not in ("", server)

            until(f"the target to leave {before}", moved, timeout=30, step=0.1)
            event["moved_after_s"] = time.time() - event["at"]
            event["to"] = _serving(target_status(control, environment))
            events.append(event)
            progress(f"failover {kind}: {before} -> {event['to']} "
                     f"after {event['moved_after_s']:.2f} s")
            next_at = event["at"] + gap
            time.sleep(max(0.0, next_at - time.time()))
        try:
            fio.wait(timeout=runtime + 60)
        except subprocess.TimeoutExpired:
            fio.kill()
            fio.wait(timeout=10)
            raise RuntimeError("fio did not finish in time") from None
        status = target_status(control, environment)
    finally:
        if fio.poll() is None:
            fio.kill()  # our own fio, by its pid
            fio.wait(timeout=10)
        registry.stop(target)
        site.stop()
    if fio.returncode != 0 or not output.exists():
        raise RuntimeError(f"fio failed ({fio.returncode})")
    jobs_out = json.loads(output.read_text())["jobs"]
    latencies = _read_latency_logs(work / "logs")
    ends = [e["at"] for e in events[1:]] + [started + runtime]
    for event, end in zip(events, ends, strict=True):
        event.update(_window(latencies, event["at"], min(event["at"] + window, end)))
    for event, record in zip(events, status["failovers"], strict=False):
        event["status_took_ms"] = record["took_ms"]
        event["status_longest_wait_ms"] = record["longest_wait_ms"]
        event["reason"] = record["reason"]
    baseline = _window(latencies, started + 0.5, events[0]["at"]) if events else {}
    return {
        "events": events,
        "baseline": baseline,
        "status": {key: status[key] for key in ("longest_wait_ms", "retried_requests",
                                                "requests", "failovers")},
        "fio": {job["jobname"]: {
            "errors": job.get("total_err", 0), "error": job["error"],
            "ios": job["read"]["total_ios"], "clat_max_ms": job["read"]["clat_ns"]["max"] / 1e6,
            "clat_p99_ms": job["read"]["clat_ns"].get("percentile", {}).get("99.000000", 0)
            / 1e6,
        } for job in jobs_out},
        "fio_errors": sum(job.get("total_err", 0) + (job["error"] != 0) for job in jobs_out),
    }


def _serving(status: dict[str, Any]) -> str:
    return str((status.get("server") or {}).get("name", ""))


def _read_latency_logs(directory: Path) -> dict[str, tuple[list[float], list[float]]]:
    """Per fio job: completion times (epoch seconds, sorted) and completion latency (ms)."""
    found: dict[str, tuple[list[float], list[float]]] = {}
    for path in sorted(directory.glob("*_clat.*.log")):
        rows = []
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) >= 2:
                rows.append((int(fields[0]) / 1e3, int(fields[1]) / 1e6))
        rows.sort()
        found[path.name.partition("_clat")[0]] = ([t for t, _ in rows], [v for _, v in rows])
    return found


def _window(
    latencies: dict[str, tuple[list[float], list[float]]], start: float, end: float
) -> dict[str, Any]:
    """Longest, p99 and counts of the reads that completed between ``start`` and ``end``."""
    every: list[float] = []
    per_job: dict[str, Any] = {}
    for job, (times, values) in latencies.items():
        chosen = values[bisect.bisect_left(times, start):bisect.bisect_right(times, end)]
        every += chosen
        per_job[job] = {"reads": len(chosen), "max_ms": max(chosen, default=0.0),
                        "p99_ms": percentile(chosen, 0.99)}
    return {
        "window_s": end - start, "reads": len(every), "max_ms": max(every, default=0.0),
        "p99_ms": percentile(every, 0.99), "over_100ms": sum(v > 100 for v in every),
        "over_2s": sum(v > 2000 for v in every), "jobs": per_job,
    }


# -- many targets ---------------------------------------------------------------------------------


class Workers:
    """A few ``bench/targets.py`` processes, each holding many target sessions."""

    def __init__(self, registry: Children, label: str, servers: Sequence[str], counts: list[int],
                 hold_max: float) -> None:
        self.children: list[Child] = []
        self.lines: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        for index, count in enumerate(counts):
            command = [sys.executable, str(HERE / "targets.py"), "--vdisk", "bench",
                       "--count", str(count), "--prefix", f"{label}-{index}",
                       "--hold-max", f"{hold_max:g}"]
            for server in servers:
                command += ["--server", server]
            child = registry.start(f"{label}-worker{index}", command, pipes=True)
            self.children.append(child)
            threading.Thread(target=self._pump, args=(index, child), daemon=True).start()

    def _pump(self, index: int, child: Child) -> None:
        assert child.process.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in child.process.stdout:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and "bench" in record:
                        self.lines.put((index, record))

    def expect(self, what: str, timeout: float) -> list[dict[str, Any]]:
        """One ``{"bench": what}`` line from every worker, in worker order."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.children):
            left = deadline - time.monotonic()
            try:
                index, record = self.lines.get(timeout=max(0.01, min(left, 1.0)))
            except queue.Empty:
                dead = [c.name for c in self.children if not c.alive()]
                if dead or left <= 0:
                    tails = "\n".join(c.log_text()[-1500:] for c in self.children)
                    raise RuntimeError(
                        f"workers did not all say {what} (exited: {dead})\n{tails}"
                    ) from None
                continue
            if record["bench"] == what:
                got[index] = record
        return [got[index] for index in range(len(self.children))]

    def tell(self, command: str) -> None:
        for child in self.children:
            with contextlib.suppress(OSError):
                assert child.process.stdin is not None
                child.process.stdin.write(command + "\n")
                child.process.stdin.flush()

    def finish(self, registry: Children) -> None:
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=40)
            registry.stop(child)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (index < total % parts) for index in range(parts)]


def boot_storm(
    registry: Children, work: Path, stores: Sequence[Path], targets: int, processes: int = 5,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``targets`` targets log in at once (``processes`` client processes, all logins of one
    process concurrent) to a 3-server site with powers 1, 1, 2, each reading 4 KiB after login.

    Every target is given the same bootstrap list (s1, s2, s3), as a site's targets usually
    are: s1 answers every login, redirecting most of them.
    """
    work.mkdir(parents=True)
    site = Site(registry, work, stores, POWERS, SITE_HOSTS, label="storm")
    site.start()
    workers = None
    try:
        workers = Workers(registry, "storm", list(site.addresses.values()),
                          split(targets, processes), hold_max=120)
        workers.expect("waiting", timeout=60)
        servers = site.servers
        cpu0 = {name: child.cpu_seconds() for name, child in servers.items()}
        rss0 = {name: child.memory_kib() for name, child in servers.items()}
        go = time.monotonic()
        workers.tell("go")
        ready = workers.expect("ready", timeout=180)
        seconds = time.monotonic() - go
        cpu = {name: child.cpu_seconds() - cpu0[name] for name, child in servers.items()}
        time.sleep(1.0)  # let the servers' heartbeats and logs settle before reading memory
        rss = {name: child.memory_kib() for name, child in servers.items()}
        workers.tell("close")
        closed = workers.expect("closed", timeout=60)
    finally:
        if workers is not None:
            workers.finish(registry)
        site.stop()
    every = [target for record in ready for target in record["targets"]]
    logged = [t for t in every if "server" in t]
    logins_ms = [t["login_s"] * 1e3 for t in logged]
    spread = Counter(t["server"] for t in logged)
    total_power = sum(POWERS)
    per_server = {}
    for name in site.names:
        sessions = spread.get(name, 0)
        expected = len(logged) * site.powers[name] / total_power
        per_server[name] = {
            "power": site.powers[name], "sessions": sessions, "expected": expected,
            "off_by": (sessions - expected) / expected if expected else 0.0,
            "cpu_seconds": cpu[name], "rss_before_kib": rss0[name], "rss_after_kib": rss[name],
            "kib_per_session": (rss[name] - rss0[name]) / sessions if sessions else None,
        }
    progress(f"boot storm: {len(logged)}/{targets} logged in, p50 "
             f"{percentile(logins_ms, 0.5):.0f} ms, p99 {percentile(logins_ms, 0.99):.0f} ms, "
             f"spread {dict(spread)}")
    return {
        "targets": targets, "processes": processes, "logged_in": len(logged),
        "failed": [t for t in every if not t["ok"]][:20],
        "failures": sum(not t["ok"] for t in every),
        "retried": sum(t["attempts"] > 1 for t in every),
        "login_p50_ms": percentile(logins_ms, 0.5), "login_p99_ms": percentile(logins_ms, 0.99),
        "login_max_ms": max(logins_ms, default=0.0),
        "read_p99_ms": percentile([t["read_s"] * 1e3 for t in logged], 0.99),
        "all_ready_s": seconds,
        "max_off_by": max(abs(s["off_by"]) for s in per_server.values()),
        "cpu_ms_per_login": 1e3 * sum(cpu.values()) / max(len(logged), 1),
        "kib_per_session": (sum(rss.values()) - sum(rss0.values())) / max(len(logged), 1),
        "servers": per_server,
        "still_open_at_close": sum(record["open"] for record in closed),
    }


def idle_sessions(
    registry: Children, work: Path, store: Path, sessions: int, hold: float,
    processes: int = 4, progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``sessions`` targets log in to one fresh pvsd, read 4 KiB each, then send nothing (no
    keepalives) for ``hold`` seconds. Memory per session = VmRSS growth / sessions."""
    work.mkdir(parents=True)
    address = f"{IDLE_HOST}:{free_port(IDLE_HOST)}"
    server = start_pvsd(registry, "idle-pvsd", address, store)
    workers = None
    try:
        time.sleep(0.5)
        rss0, hwm0 = server.memory_kib(), server.memory_kib("VmHWM")
        workers = Workers(registry, "idle", [address], split(sessions, processes),
                          hold_max=hold + 120)
        workers.expect("waiting", timeout=60)
        workers.tell("go")
        ready = workers.expect("ready", timeout=180)
        time.sleep(1.0)
        rss_open = server.memory_kib()
        cpu0, begun = server.cpu_seconds(), time.monotonic()
        time.sleep(hold)
        idle_cpu = (server.cpu_seconds() - cpu0) / (time.monotonic() - begun)
        rss_end, hwm = server.memory_kib(), server.memory_kib("VmHWM")
        workers.tell("close")
        closed = workers.expect("closed", timeout=60)
    finally:
        if workers is not None:
            workers.finish(registry)
        registry.stop(server)
    every = [t for record in ready for t in record["targets"]]
    logged = sum("server" in t for t in every)
    still_open = sum(record["open"] for record in closed)
    per_session = (rss_end - rss0) / logged if logged else float("nan")
    progress(f"idle sessions: {logged} logged in, {still_open} still open after {hold:g} s, "
             f"{per_session:.1f} KiB each")
    return {
        "sessions": sessions, "processes": processes, "logged_in": logged,
        "still_open": still_open, "hold_s": hold, "rss_before_kib": rss0,
        "rss_open_kib": rss_open, "rss_end_kib": rss_end, "hwm_before_kib": hwm0,
        "hwm_end_kib": hwm, "kib_per_session": per_session,
        "kib_per_session_at_open": (rss_open - rss0) / logged if logged else float("nan"),
        "idle_cpu_share": idle_cpu,
        "login_p99_ms": percentile([t["login_s"] * 1e3 for t in every if "server" in t], 0.99),
    }


def median_of(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")

