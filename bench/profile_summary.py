"""Reading py-spy profiles: where one process spent its busy time.

``bench/stream.py --profile DIR`` records pvsd and the pvs client with
``py-spy record --native --format raw`` (collapsed stacks, C frames included); this module turns
such a file into shares of busy samples, by kind of work (the native frame that was running) and
by the innermost line of Python (which includes the C code that line called). Waiting in epoll
or on a lock counts as idle.

    python bench/profile_summary.py DIR/*.txt
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside_python) if beside_python.exists() else None)


_IDLE = ("epoll_wait", "epoll_pwait", "PyThread_acquire_lock_timed", "select.select")
_CATEGORIES = (  # first match on the leaf (native) frame wins
    ("crc32 (zlib)", ("crc32",)),
    ("file read syscalls", ("preadv", "pread")),
    ("socket send syscalls", ("write (libc", "writev", "send", "sendmsg")),
    ("socket receive syscalls", ("read (libc", "recv", "readv")),
    ("malloc/free/brk", ("malloc", "free", "realloc", "brk", "calloc", "morecore")),
    ("garbage collector", ("gc_collect",)),
)


@dataclasses.dataclass
class Profile:
    """Where one process spent its busy samples (waiting in epoll or on a lock is idle)."""

    samples: int
    idle: float
    categories: list[tuple[str, float]]
    """Share of busy samples per kind of work, by the native frame that was running."""
    lines: list[tuple[str, float]]
    """Share of busy samples per innermost Python line (including the C code it called)."""


def summarize(path: Path, count: int = 8) -> Profile:
    """Read a py-spy ``--native --format raw`` file (collapsed stacks); imports left out."""
    categories: dict[str, int] = {}
    lines: dict[str, int] = {}
    samples = idle = 0
    for record in path.read_text().splitlines():
        stack, _, number = record.rpartition(" ")
        if not stack or not number.isdigit() or "_find_and_load" in stack:
            continue
        hits, frames = int(number), stack.split(";")
        samples += hits
        if any(marker in frames[-1] or "PyThread_acquire_lock" in frame
               for frame in frames for marker in _IDLE):
            idle += hits
            continue
        category = next(
            (name for name, markers in _CATEGORIES if any(m in frames[-1] for m in markers)),
            "unnamed libc code (memcpy, memset)" if frames[-1].startswith("0x")
            else "Python and other C code",
        )
        categories[category] = categories.get(category, 0) + hits
        python = [frame for frame in frames if ".py:" in frame]
        line = _short(python[-1]) if python else "(no Python frame)"
        lines[line] = lines.get(line, 0) + hits
    busy = samples - idle

    def ranked(totals: dict[str, int]) -> list[tuple[str, float]]:
        ordered = sorted(totals.items(), key=lambda item: -item[1])[:count]
        return [(name, hits / busy) for name, hits in ordered] if busy else []

    return Profile(samples, idle / samples if samples else 0.0, ranked(categories), ranked(lines))


def _short(frame: str) -> str:
    """``f (/long/path/pvsd/session.py:248)`` -> ``f (pvsd/session.py:248)``."""
    name, _, where = frame.partition(" (")
    parts = where.rstrip(")").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def print_profiles(profiles: dict[str, Profile]) -> None:
    for name, summary in profiles.items():
        print(f"\n{name}: {summary.samples} samples, {summary.idle:.0%} idle; shares of busy time")
        for category, share in summary.categories:
            print(f"  {share:6.1%}  {category}")
        print("  by innermost Python line:")
        for line, share in summary.lines:
            print(f"  {share:6.1%}  {line}")


def main(paths: list[str]) -> int:
    print_profiles({Path(path).stem: summarize(Path(path)) for path in paths})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
