"""A site in the lab (deploy/lab.py): three servers and four targets over two subnets, each
host a network namespace on one bridge, streaming under load while the network and the
servers fail.

The bar: zero read errors and every pass byte-exact (the SHA-256 of the vDisk); targets leave
a cut, a stopped and a killed server within seconds, as their status shows; and with subnet
affinity best_effort, each target lands on a server of its own subnet whenever one is
available, and elsewhere only when none is.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import Lab

from pvs_target.control import query

MIB = 1 << 20
SIZE = 16 * MIB
READER_RATE = 16e6
"""Bytes per second per reader: load that two CPUs carry beside the servers' heartbeats."""
MOVE_TIMEOUT = 20.0

pytestmark = [pytest.mark.lab, pytest.mark.timeout(170)]


def _unavailable() -> str:
    """Why the lab cannot run here, or "" if it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, veths): run pytest as root"
    if shutil.which("ip") is None:
        return "the lab needs iproute2's 'ip' (apt-get install -y iproute2)"
    probe = f"pvslab-probe{os.getpid()}"
    made = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10, check=False
    )
    if made.returncode != 0:
        return f"'ip netns add' does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10, check=False)
    return ""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    # PVS_LAB_NBD=off reads through a stream of each reader's own instead of the NBD export.
    nbd = os.environ.get("PVS_LAB_NBD", "auto")
    built = Lab(tmp_path / "lab", servers=3, targets=4, subnets=2, size=SIZE, nbd=nbd)
    try:
        built.up()
        yield built
    finally:
        built.down()


def test_targets_stream_through_a_cut_a_stop_and_a_kill(lab: Lab, tmp_path: Path) -> None:
    began = time.monotonic()
    subnet = {host.name: host.subnet for host in lab.hosts}
    targets = [target.name for target in lab.state.targets]
    measured: dict[str, Any] = {"nbd": lab.state.nbd, "nbd_error": lab.state.nbd_error}

    # Logins: best effort affinity puts every target on its own subnet (each has a server).
    where = {name: lab.target_status(name)["server"]["name"] for name in targets}
    for target, server in where.items():
        assert subnet[server] == subnet[target], f"{target} landed off its subnet: {where}"
    for target in targets:  # pinned to the one manifest every server was given
        assert lab.target_status(target)["identity"] == lab.state.identity

    for target in targets:
        lab.start_reader(target, seconds=150, rate=READER_RATE)
    _until(lambda: all(_report(lab, t).get("good_passes", 0) >= 1 for t in targets), 40,
           "every reader to finish a first pass", lab)

    # 1. Cut the link of the server t1 streams from: its targets fail over, and stay on
    # their subnet, where another server is still available.
    victim = where["t1"]
    moved = _until_moved(lab, [t for t, s in where.items() if s == victim], victim,
                         lambda: lab.cut(victim))
    measured["cut"] = {"server": victim, "targets": moved}
    for target, seen in moved.items():
        assert subnet[seen["to"]] == subnet[target], f"{target} left its subnet: {seen}"
        assert seen["from"] == victim
    _until(lambda: _view(lab)[victim]["up"] is False, 15, f"the site to see {victim} down", lab)

    # 2. Stop the stream service of a server on the other subnet: its targets must move,
    # off their subnet now, to the one server left.
    where = _where(lab, targets)
    stopped = next(s.name for s in lab.state.servers
                   if s.name != victim and subnet[s.name] != subnet[victim])
    last = next(s.name for s in lab.state.servers if s.name not in (victim, stopped))
    moved = _until_moved(lab, [t for t, s in where.items() if s == stopped], stopped,
                         lambda: lab.stop_stream(stopped))
    measured["stop-stream"] = {"server": stopped, "targets": moved}
    assert all("relogin" in seen["reason"] for seen in moved.values()), moved
    assert set(_where(lab, targets).values()) == {last}

    # 3. Both back; then kill the last one: everyone fails over, onto their own subnet again.
    lab.restore(victim)
    _until(lambda: all(s["up"] for s in _view(lab).values()), 20,
           f"{victim} and the site to hear each other again", lab)
    lab.start_stream(stopped)
    _until(lambda: all(s["up"] and s["state"] == "serving" for s in _view(lab).values()), 20,
           "every server to be up and serving", lab)
    moved = _until_moved(lab, targets, last, lambda: lab.kill(last))
    measured["kill"] = {"server": last, "targets": moved}
    for target, seen in moved.items():
        assert subnet[seen["to"]] == subnet[target], f"{target} left its subnet: {seen}"

    # The readers: zero errors, every pass the vDisk's exact bytes, through all of it (each
    # finishes one more whole pass after the last failover).
    passes = {t: _report(lab, t).get("passes", 0) for t in targets}
    _until(lambda: all(_report(lab, t).get("passes", 0) > passes[t] for t in targets), 30,
           "every reader to finish a pass after the kill", lab)
    reports = lab.stop_readers()
    assert sorted(reports) == targets
    for target, report in reports.items():
        assert report["errors"] == [], f"{target}: {report['errors'][:3]}"
        assert report["mismatches"] == [], f"{target}: {report['mismatches'][:3]}"
        assert report["passes"] == report["good_passes"] >= 2, f"{target}: {report}"
    measured["readers"] = {
        t: {k: r[k] for k in ("mode", "passes", "bytes", "servers", "longest_wait_ms")}
        for t, r in reports.items()
    }
    for target in targets:
        status = lab.target_status(target)
        assert status["state"] == "streaming"
        assert status["identity"] == lab.state.identity
        measured.setdefault("history", {})[target] = status["failovers"]
    measured["seconds"] = round(time.monotonic() - began, 1)
    for fault in ("cut", "stop-stream", "kill"):  # reads waited: known once they all ended
        for target, seen in measured[fault]["targets"].items():
            record = measured["history"][target][seen["index"]]
            seen["longest_wait_ms"] = record["longest_wait_ms"]
    (tmp_path / "measured.json").write_text(json.dumps(measured, indent=1))
    print(f"\nlab: readers through {'the NBD export' if lab.state.nbd else 'their own stream'}"
          f", {measured['seconds']} s of faults; full record in {tmp_path / 'measured.json'}")
    for fault in ("cut", "stop-stream", "kill"):
        for target, seen in sorted(measured[fault]["targets"].items()):
            print(f"  {fault} {measured[fault]['server']}: {target} on {seen['to']} after "
                  f"{seen['seconds_to_status']} s (relogin took {seen['took_ms']} ms, longest "
                  f"read wait {seen['longest_wait_ms']} ms; {seen['reason']})")


# -- helpers -----------------------------------------------------------------------------------


def _status(lab: Lab, target: str) -> dict[str, Any]:
    """The target's status straight from its control socket: fast enough to poll."""
    control = str(lab.control(lab.host(target)))
    return asyncio.run(query(control, timeout=5))


def _where(lab: Lab, targets: list[str]) -> dict[str, str]:
    return {t: (_status(lab, t).get("server") or {}).get("name", "") for t in targets}


def _until_moved(
    lab: Lab, targets: list[str], server: str, act: Callable[[], object]
) -> dict[str, dict[str, Any]]:
    """Do ``act``; then poll each target's status until it streams from another server.
    Returns, per target, the seconds from ``act`` to a status showing the new server, and the
    failover record that status holds."""
    assert targets, f"no target streams from {server}: nothing to move"
    before = {t: len(_status(lab, t)["failovers"]) for t in targets}
    started = time.monotonic()
    act()
    acted = time.monotonic()
    moved: dict[str, dict[str, Any]] = {}
    for _ in range(int(MOVE_TIMEOUT / 0.05) + 1):
        for target in targets:
            if target in moved:
                continue
            status = _status(lab, target)
            now = (status.get("server") or {}).get("name")
            if now and now != server and status["state"] == "streaming":
                record = status["failovers"][-1]
                assert len(status["failovers"]) > before[target]
                moved[target] = {
                    "index": before[target],
                    "from": record["from"]["name"], "to": now, "reason": record["reason"],
                    "seconds_to_status": round(time.monotonic() - started, 2),
                    "took_ms": record["took_ms"], "longest_wait_ms": record["longest_wait_ms"],
                }
        if len(moved) == len(targets) or time.monotonic() - acted > MOVE_TIMEOUT:
            break
        time.sleep(0.05)
    missing = sorted(set(targets) - set(moved))
    assert not missing, f"{missing} still on {server} after {MOVE_TIMEOUT:g} s"
    return moved


def _view(lab: Lab) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in lab.servers_view() if s.get("name")}


def _report(lab: Lab, target: str) -> dict[str, Any]:
    try:
        report: dict[str, Any] = json.loads(lab.reader_report(lab.host(target)).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return report


def _until(predicate: Callable[[], bool], timeout: float, what: str, lab: Lab) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {lab.status()}")
