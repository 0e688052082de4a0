"""Progress of pvsctl's long local passes (import, manifest, verify), on stderr.

An administrator hashing a 2 TiB image must see that something happens and how long it will
take: on a terminal a bar (gone once the pass ends, so only the result stays on screen);
otherwise, where a bar would only litter a log file with control codes, one line when the pass
starts and one every `LINE_INTERVAL` seconds (none for a short pass). stdout is left to
results.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pvsd.console.tables import duration, human_size

LINE_INTERVAL = 5.0
"""Seconds between progress lines when stderr is not a terminal."""
QUIET_BELOW = 256 << 20
"""Passes over fewer bytes end within a second or two: no lines in a log for them."""

Update = Callable[[int], None]
"""Tell the meter how many bytes of the total are done (absolute, not a step)."""


@contextlib.contextmanager
def meter(label: str, total: int, *, interval: float = LINE_INTERVAL) -> Iterator[Update]:
    """Show the progress of a pass over ``total`` bytes while the block runs."""
    console = Console(stderr=True, markup=False)
    if console.is_terminal:
        with _bar(console, label, total) as update:
            yield update
        return
    if total < QUIET_BELOW:
        yield lambda _done: None
        return
    lines = _Lines(label, total, interval)
    lines.start()
    yield lines.update


@contextlib.contextmanager
def _bar(console: Console, label: str, total: int) -> Iterator[Update]:
    progress = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(),
        DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )
    task = progress.add_task(label, total=total)

    def update(done: int) -> None:
        progress.update(task, completed=done)

    with progress:
        yield update


class _Lines:
    """One line at the start, then at most one per interval, for logs and pipes."""

    def __init__(self, label: str, total: int, interval: float) -> None:
        self._label = label
        self._total = total
        self._interval = interval
        self._started = time.monotonic()
        self._next = self._started + interval

    def start(self) -> None:
        _say(f"{self._label}: started, {human_size(self._total)}")

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now < self._next or done >= self._total:
            return
        self._next = now + self._interval
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", {duration((self._total - done) / rate)} left" if rate > 0 else ""
        percent = 100 * done / self._total if self._total else 100.0
        _say(
            f"{self._label}: {percent:.0f}% ({human_size(done)} of {human_size(self._total)}), "
            f"{human_size(int(rate))}/s{left}"
        )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
