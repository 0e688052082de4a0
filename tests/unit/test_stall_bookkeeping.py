"""Stalled stores as a pure record (pvsd/stalls.py), and the writer locks of a previous life."""

from __future__ import annotations

import json
from pathlib import Path

from pvsd import locks
from pvsd.stalls import StalledStores, StallTracker, Transition


def test_a_store_stalls_with_its_first_overdue_request_and_recovers_with_its_last() -> None:
    tracker = StallTracker()
    first, second, other = tracker.started("a"), tracker.started("a"), tracker.started("b")
    assert not tracker.stalled("a")
    assert tracker.overdue(first) is Transition.STALLED
    assert tracker.overdue(second) is None  # already stalled: said once
    assert tracker.stalled("a") and not tracker.stalled("b")
    assert tracker.waiting("a") == 2
    assert tracker.finished(other) is None
    assert tracker.finished(first) is None  # one overdue request still stuck
    assert tracker.stalled("a")
    assert tracker.finished(second) is Transition.RECOVERED
    assert not tracker.stalled("a") and tracker.stalled_stores() == []


def test_requests_that_finish_in_time_never_stall_their_store() -> None:
    tracker = StallTracker()
    token = tracker.started("a")
    assert tracker.finished(token) is None
    assert tracker.overdue(token) is None  # the timer fired after the thread returned
    assert not tracker.stalled("a")


def test_a_request_started_on_a_stalled_store_does_not_delay_its_recovery() -> None:
    tracker = StallTracker()
    stuck = tracker.started("a")
    assert tracker.overdue(stuck) is Transition.STALLED
    late = tracker.started("a")  # not overdue yet
    assert tracker.finished(stuck) is Transition.RECOVERED
    assert tracker.overdue(late) is Transition.STALLED  # and it stalls again on its own
    assert tracker.finished(late) is Transition.RECOVERED
    assert tracker.overdue(late) is None and tracker.finished(late) is None


def _lock(store: Path, name: str, server: str) -> Path:
    path = store / f"{name}.lock"
    path.write_text(json.dumps({"server": server, "session": 5, "device": "d", "since": 1.0}))
    return path


def test_a_store_stalls_for_the_server_when_any_process_finds_it_and_recovers_when_none_does(
) -> None:
    stores = StalledStores()
    assert stores.change("a", "worker 1", True) is Transition.STALLED
    assert stores.change("a", "pvsd", True) is None
    assert stores.change("a", "worker 1", True) is None  # said again
    assert stores.found_by("a") == ["pvsd", "worker 1"] and not stores.stalled("b")
    assert stores.change("a", "worker 1", False) is None  # pvsd still waits on it
    assert stores.change("b", "worker 2", False) is None  # never stalled
    assert stores.change("a", "pvsd", False) is Transition.RECOVERED
    assert not stores.stalled("a") and stores.found_by("a") == []


def test_a_restarted_server_releases_only_its_own_locks(tmp_path: Path) -> None:
    mine, theirs = _lock(tmp_path, "a", "pvs1"), _lock(tmp_path, "b", "pvs2")
    broken = tmp_path / "c.lock"
    broken.write_text("not json")
    assert locks.release_stale(tmp_path, "pvs1") == ["a"]
    assert not mine.exists() and theirs.exists() and broken.exists()
    assert locks.release_stale(tmp_path / "missing", "pvs1") == []
