"""What ``bench/run.py`` reports: medians, ratios against the targets, the previous run beside.

The JSON written to ``--out`` holds every raw run and a ``summary``; the PNG charts the
summary. A later run finds the newest earlier ``bench-*.json`` there and shows its figures in
the "previous" columns.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

PVS, ONE_HOP, TWO_HOPS = "pvs", "nbdkit 1 hop", "nbdkit 2 hops"
PLANNED_MS, CRASH_MS, IDLE_KIB = 100.0, 2000.0, 64.0


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str
    label: str
    unit: str
    workload: str
    """"copy" (nbdcopy), "seq" (fio 1 MiB reads) or "rand" (fio 4 KiB random reads)."""
    depth: int
    target: float | None
    """The least pvs / two-hop ratio that meets issue 7's target (None: no target)."""


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def evaluate(report: dict[str, Any]) -> None:
    """Add ``report["summary"]``: medians, ratios and each target met or not."""
    summary: dict[str, Any] = {}
    loads = []
    streaming = report.get("streaming")
    if streaming:
        rows = []
        for spec in report["specs"]:
            runs = streaming["runs"][spec["key"]]
            medians = {p: _median([r["value"] for r in runs[p]]) for p in runs}
            spreads = {}
            for party, measured in runs.items():
                values = [r["value"] for r in measured]
                spreads[party] = (max(values) - min(values)) / 2 / medians[party] \
                    if medians[party] else 0.0
            server_cpu = {p: _median([r.get("server_cpu", math.nan) for r in runs[p]])
                          for p in runs}
            loads += [r["load_average_1min"] for measured in runs.values() for r in measured]
            ratio = medians[PVS] / medians[TWO_HOPS]
            rows.append({
                "key": spec["key"], "label": spec["label"], "unit": spec["unit"],
                "median": medians, "spread": spreads, "server_cpu": server_cpu,
                "ratio_one_hop": medians[PVS] / medians[ONE_HOP], "ratio_two_hops": ratio,
                "target": spec["target"],
                "met": None if spec["target"] is None else ratio >= spec["target"],
            })
        summary["streaming"] = rows
    failover = report.get("failover")
    if failover:
        kinds = {}
        for kind, limit in (("planned", PLANNED_MS), ("crash", CRASH_MS)):
            events = [e for run in failover for e in run["events"] if e["kind"] == kind]
            fio_max = max((e["max_ms"] for e in events), default=math.nan)
            status_max = max((e.get("status_longest_wait_ms", 0.0) for e in events),
                             default=math.nan)
            worst = max(fio_max, status_max)
            kinds[kind] = {
                "events": len(events), "fio_max_ms": fio_max,
                "fio_p99_ms": max((e["p99_ms"] for e in events), default=math.nan),
                "fio_max_ms_runs": [round(e["max_ms"], 1) for e in events],
                "status_longest_wait_ms": status_max,
                "took_ms": _median([e.get("status_took_ms", math.nan) for e in events]),
                "over_limit_reads": sum(e["over_100ms" if kind == "planned" else "over_2s"]
                                        for e in events),
                "limit_ms": limit, "met": worst <= limit,
            }
        errors = sum(run["fio_errors"] for run in failover)
        summary["failover"] = {**kinds, "fio_errors": errors, "errors_met": errors == 0,
                               "baseline_p99_ms": _median([r["baseline"]["p99_ms"]
                                                           for r in failover if r["baseline"]]),
                               "status_longest_wait_ms": max(r["status"]["longest_wait_ms"]
                                                             for r in failover)}
    storm = report.get("storm")
    if storm:
        middle = sorted(storm, key=lambda run: run["login_p99_ms"])[len(storm) // 2]
        summary["storm"] = {
            key: _median([run[key] for run in storm])
            for key in ("login_p50_ms", "login_p99_ms", "login_max_ms", "all_ready_s",
                        "max_off_by", "cpu_ms_per_login", "kib_per_session", "read_p99_ms")
        } | {"targets": storm[0]["targets"], "processes": storm[0]["processes"],
             "failures": sum(run["failures"] for run in storm),
             "retried": sum(run["retried"] for run in storm),
             "servers": middle["servers"]}
    idle = report.get("idle")
    if idle:
        per_session = _median([run["kib_per_session"] for run in idle])
        summary["idle"] = {
            "sessions": idle[0]["sessions"], "hold_s": idle[0]["hold_s"],
            "kib_per_session": per_session,
            "kib_per_session_runs": [round(run["kib_per_session"], 1) for run in idle],
            "still_open": min(run["still_open"] for run in idle),
            "idle_cpu_share": _median([run["idle_cpu_share"] for run in idle]),
            "limit_kib": IDLE_KIB, "met": per_session < IDLE_KIB,
        }
    summary["load_average"] = {
        "measurements_min": min(loads, default=math.nan),
        "measurements_max": max(loads, default=math.nan),
        "start": report["load_average"]["start"][0], "end": report["load_average"]["end"][0],
    }
    report["summary"] = summary


def find_previous(out: Path, stem: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The newest earlier ``bench-*.json`` in ``out``: preferably one with the same image size
    and mode (quick or not) that ran every part this run runs, else the newest with the same
    size and mode, else the newest of all."""
    found = []
    for path in out.glob("bench-*.json"):
        if path.stem == stem:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "summary" in data and "started" in data:
            found.append(data | {"file": path.name})
    found.sort(key=lambda data: data["started"], reverse=True)

    def alike(data: dict[str, Any]) -> bool:
        return all(data["settings"].get(key) == settings[key] for key in ("size", "quick"))

    def covers(data: dict[str, Any]) -> bool:
        return set(settings["parts"]) <= set(data["settings"].get("parts", []))

    for choose in (lambda d: alike(d) and covers(d), alike, lambda _d: True):
        chosen = [data for data in found if choose(data)]
        if chosen:
            return chosen[0]
    return None


# -- the tables ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _mark(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def tables(report: dict[str, Any], previous: dict[str, Any] | None) -> list[
        tuple[str, list[str], list[list[str]], str]]:
    summary = report["summary"]
    before = (previous or {}).get("summary", {})
    out = []
    if "streaming" in summary:
        earlier = {row["key"]: row for row in before.get("streaming", [])}
        rows = []
        for row in summary["streaming"]:
            median, spread = row["median"], row["spread"]
            old = earlier.get(row["key"])
            rows.append([
                row["label"], row["unit"],
                *(f"{_fmt(median[p])} ±{spread[p]:.0%}" for p in (PVS, ONE_HOP, TWO_HOPS)),
                f"{row['ratio_one_hop']:.2f}", f"{row['ratio_two_hops']:.2f}",
                "-" if row["target"] is None else f"≥ {row['target']:.1f}", _mark(row["met"]),
                f"{old['ratio_two_hops']:.2f}" if old else "-",
            ])
        runs = report["settings"]["runs"]
        out.append((
            "Streaming through NBD, loopback (ratio = pvs / peer; two hops is pvs's shape)",
            ["workload", "unit", "pvs", ONE_HOP, TWO_HOPS, "pvs/1 hop", "pvs/2 hops", "target",
             "met", "prev pvs/2 hops"],
            rows,
            f"Medians of {runs} alternating runs (± half the range). Same image in page cache, "
            "same clients (nbdcopy, fio --ioengine=nbd) on every server.",
        ))
        cpu_rows = []
        for row in summary["streaming"]:
            unit = "ms/GiB" if row["unit"] == "MB/s" else "µs/request"
            cpu = row["server_cpu"]
            cpu_rows.append([row["label"], unit, *(_fmt(cpu[p], 1 if unit.startswith("µs") else 0)
                                                   for p in (PVS, ONE_HOP, TWO_HOPS)),
                             f"{cpu[PVS] / cpu[TWO_HOPS]:.1f}" if cpu[TWO_HOPS] else "-"])
        out.append((
            "Server-side CPU per unit of work (pvsd + pvs-target; nbdkit; both nbdkits)",
            ["workload", "per", PVS, ONE_HOP, TWO_HOPS, "pvs/2 hops"], cpu_rows,
            "CPU time (user + system) from /proc/PID/stat; less disturbed by others' load.",
        ))
    if "failover" in summary:
        failover = summary["failover"]
        old = before.get("failover", {})
        rows = []
        for kind in ("planned", "crash"):
            item = failover[kind]
            rows.append([
                "stop-stream (planned)" if kind == "planned" else "SIGKILL (crash)",
                _fmt(item["fio_max_ms"], 1), _fmt(item["fio_p99_ms"], 1),
                _fmt(item["status_longest_wait_ms"], 1), _fmt(item["took_ms"], 1),
                str(item["over_limit_reads"]), f"≤ {item['limit_ms']:,.0f} ms",
                _mark(item["met"]),
                _fmt(old.get(kind, {}).get("fio_max_ms"), 1),
            ])
        rows.append(["fio read errors (all runs)", str(failover["fio_errors"]), "", "", "", "",
                     "0", _mark(failover["errors_met"]), str(old.get("fio_errors", "-"))])
        out.append((
            "Failover under fio load (4k randread QD8 + 1M seq QD1), default attach settings",
            ["event", "fio max ms", "fio p99 ms", "status wait ms", "took ms", "reads over",
             "target", "met", "prev fio max"],
            rows,
            "fio max/p99: completion latency of the reads completed within 5 s of the event, "
            f"worst of {len(report['failover'])} runs; status: the target's longest_wait_ms for "
            f"that failover. Outside events fio p99 is {failover['baseline_p99_ms']:.1f} ms.",
        ))
    if "storm" in summary:
        storm = summary["storm"]
        old = before.get("storm", {})
        rows = [
            ["login p50 / p99 / max (ms)", f"{_fmt(storm['login_p50_ms'])} / "
             f"{_fmt(storm['login_p99_ms'])} / {_fmt(storm['login_max_ms'])}",
             f"{_fmt(old.get('login_p50_ms'))} / {_fmt(old.get('login_p99_ms'))}"],
            ["all logged in and read (s)", _fmt(storm["all_ready_s"], 2),
             _fmt(old.get("all_ready_s"), 2)],
            ["spread: sessions (expected) per server",
             ", ".join(f"{name} (power {s['power']:g}): {s['sessions']} ({s['expected']:.0f})"
                       for name, s in storm["servers"].items()),
             f"max off {old['max_off_by']:.0%}" if old else "-"],
            ["largest deviation from power share", f"{storm['max_off_by']:.0%}", ""],
            ["server CPU per login (ms, all servers)", _fmt(storm["cpu_ms_per_login"], 2),
             _fmt(old.get("cpu_ms_per_login"), 2)],
            ["server CPU (s) per server", ", ".join(
                f"{name}: {s['cpu_seconds']:.2f}" for name, s in storm["servers"].items()), ""],
            ["server memory per session (KiB, VmRSS delta)", _fmt(storm["kib_per_session"], 1),
             _fmt(old.get("kib_per_session"), 1)],
            ["failed logins / targets that retried", f"{storm['failures']} / {storm['retried']}",
             ""],
        ]
        out.append((
            f"Boot storm: {storm['targets']} targets at once ({storm['processes']} processes), "
            "3 servers, powers 1, 1, 2",
            ["figure", "this run (median of runs)", "previous"], rows,
            "Login time: from the go signal to LOGIN_OK (redirect and retries included); each "
            "target then reads 4 KiB.",
        ))
    if "idle" in summary:
        idle = summary["idle"]
        old = before.get("idle", {})
        rows = [[
            f"{idle['sessions']} idle sessions, one pvsd, {idle['hold_s']:g} s, no keepalives",
            _fmt(idle["kib_per_session"], 1), f"< {idle['limit_kib']:.0f} KiB",
            _mark(idle["met"]), str(idle["still_open"]), f"{idle['idle_cpu_share']:.1%}",
            _fmt(old.get("kib_per_session"), 1),
        ]]
        out.append((
            "Idle target sessions: server memory",
            ["what", "KiB/session", "target", "met", "open at end", "pvsd CPU idle",
             "previous"], rows,
            "VmRSS of pvsd at the end of the idle time minus before the first login, divided by "
            "the sessions (each logged in and read 4 KiB).",
        ))
    return out


def print_tables(
    made: list[tuple[str, list[str], list[list[str]], str]], footer: str = "", *,
    width: int = 170, left: int = 1,
) -> None:
    """Each (title, headers, rows, note) as a table (rich where installed; the first ``left``
    columns aligned left), then the footer."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for title, headers, rows, note in made:
            print(f"\n{title}")
            widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
            for row in [headers, *rows]:
                print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            print(note)
        if footer:
            print(footer)
        return
    console = Console(width=width)
    for title, headers, rows, note in made:
        table = Table(title=title, caption=note)
        for index, header in enumerate(headers):
            table.add_column(header, justify="left" if index < left else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if footer:
        console.print(footer)


def print_report(report: dict[str, Any], previous: dict[str, Any] | None) -> None:
    made = tables(report, previous)
    load = report["summary"]["load_average"]
    during = ""
    if not math.isnan(load["measurements_min"]):
        during = (f"{load['measurements_min']:.1f}-{load['measurements_max']:.1f} during "
                  "streaming, ")
    footer = (
        f"commit {report['revision']}, started {report['started']}; 1-minute load average "
        f"{load['start']:.1f} at start, {during}{load['end']:.1f} at end, "
        f"on {report['machine'].get('cpus')} CPUs"
    )
    if previous:
        footer += f"; previous: {previous['file']} ({previous['revision']})"
    print_tables(made, footer)
    for key, text in report.get("errors", {}).items():
        print(f"\n{key} FAILED: {text}")
    profiles = (report.get("streaming") or {}).get("profiles") or {}
    for workload, found in profiles.items():
        print(f"\nprofile of pvs under {workload} (py-spy --native; shares of busy samples; "
              f"{found['value_under_profiler']:,.0f} under the profiler)")
        for name, profile in found["profiles"].items():
            print(f"  {name}: {profile['samples']} samples, {profile['idle']:.0%} idle")
            for category, share in profile["categories"][:5]:
                print(f"    {share:6.1%}  {category}")
            for line, share in profile["lines"][:6]:
                print(f"    {share:6.1%}  {line}")


# -- files --------------------------------------------------------------------------------------


def save(
    report: dict[str, Any], previous: dict[str, Any] | None, out: Path, stem: str
) -> list[Path]:
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    written = [json_path]
    try:
        written.append(chart(report, previous, out / f"{stem}.png"))
    except ImportError:
        print("no chart: matplotlib is missing (pip install matplotlib; a bench-only need)")
    return written


def chart(report: dict[str, Any], previous: dict[str, Any] | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    before = (previous or {}).get("summary", {})
    figure, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    load = summary["load_average"]
    busiest = max(value for value in (load["start"], load["end"], load["measurements_max"])
                  if not math.isnan(value))
    figure.suptitle(f"pvs bench {report['started'][:16]} commit {report['revision']} "
                    f"(1-min load average {load['start']:.1f} at start, up to {busiest:.1f}, "
                    f"{report['machine'].get('cpus')} CPUs)", fontsize=11)
    ratios = axes[0][0]
    if "streaming" in summary:
        rows = summary["streaming"]
        x = range(len(rows))
        ratios.bar([i - 0.2 for i in x], [r["ratio_two_hops"] for r in rows], 0.4,
                   label="pvs / nbdkit 2 hops", color="tab:blue")
        ratios.bar([i + 0.2 for i in x], [r["ratio_one_hop"] for r in rows], 0.4,
                   label="pvs / nbdkit 1 hop", color="tab:gray")
        for i, row in enumerate(rows):
            if row["target"] is not None:
                ratios.plot([i - 0.4, i], [row["target"]] * 2, color="red", linewidth=2)
        old = {row["key"]: row for row in before.get("streaming", [])}
        if old:
            ratios.scatter([i - 0.2 for i, r in enumerate(rows) if r["key"] in old],
                           [old[r["key"]]["ratio_two_hops"] for r in rows if r["key"] in old],
                           marker="_", s=400, color="black", label="previous pvs / 2 hops")
        ratios.axhline(1.0, color="black", linewidth=0.5)
        ratios.set_xticks(list(x), [r["key"] for r in rows])
        ratios.set_title("throughput ratio (red: target)")
        ratios.legend(fontsize=8)
    waits = axes[0][1]
    if "failover" in summary:
        failover = summary["failover"]
        names = ["planned", "crash"]
        waits.bar([0, 1], [max(failover[k]["fio_max_ms"], 0.1) for k in names], 0.35,
                  label="fio max read latency", color="tab:blue")
        waits.bar([0.35, 1.35], [max(failover[k]["status_longest_wait_ms"], 0.1)
                                 for k in names], 0.35, label="status longest_wait_ms",
                  color="tab:orange")
        for i, kind in enumerate(names):
            waits.plot([i - 0.2, i + 0.55], [failover[kind]["limit_ms"]] * 2, color="red")
        waits.set_yscale("log")
        waits.set_xticks([0.17, 1.17], ["stop-stream", "SIGKILL"])
        waits.set_ylabel("ms")
        waits.set_title(f"longest read wait in a failover (fio errors: {failover['fio_errors']})")
        waits.legend(fontsize=8)
    storm_axis = axes[1][0]
    if "storm" in summary:
        storm = summary["storm"]
        servers = storm["servers"]
        names = list(servers)
        storm_axis.bar([i - 0.2 for i in range(len(names))],
                       [servers[n]["sessions"] for n in names], 0.4, label="sessions")
        storm_axis.bar([i + 0.2 for i in range(len(names))],
                       [servers[n]["expected"] for n in names], 0.4, label="power share",
                       color="tab:gray")
        storm_axis.set_xticks(range(len(names)),
                              [f"{n} (power {servers[n]['power']:g})" for n in names])
        storm_axis.set_title(f"boot storm {storm['targets']}: login p50 "
                             f"{storm['login_p50_ms']:.0f} ms, p99 {storm['login_p99_ms']:.0f} ms")
        storm_axis.legend(fontsize=8)
    idle_axis = axes[1][1]
    if "idle" in summary:
        idle = summary["idle"]
        bars = [("this run", idle["kib_per_session"])]
        if before.get("idle"):
            bars.insert(0, ("previous", before["idle"]["kib_per_session"]))
        if "storm" in summary:
            bars.append(("boot storm", summary["storm"]["kib_per_session"]))
        idle_axis.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
        idle_axis.axhline(idle["limit_kib"], color="red")
        idle_axis.set_ylabel("KiB of pvsd RSS per session")
        idle_axis.set_title(f"{idle['sessions']} idle sessions (red: target)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
