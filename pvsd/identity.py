"""Stat keys, and the record of which image state was verified against which manifest.

A replica's identity is its manifest's (``pvsd/manifest.py``), but it is published only once
the image is known to match that manifest, and checking that reads the whole image. A
restarted pvsd must not read again what it checked before, so the check is remembered in
``NAME.identity.json``: the stat key of the image that was read and the top digest of the
manifest tree it matched. It is trusted only while the image still has that stat key and the
manifest that tree. The key holds ctime and the inode because a user can set mtime back after
changing the content, but only the kernel sets ctime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from pvsd.properties import write_atomically

CACHE_SUFFIX = ".identity.json"
SETTLE_NS = 100_000_000
"""How old the image's ctime must be before reading starts; see `wait_until_settled`."""


@dataclasses.dataclass(frozen=True, slots=True)
class StatKey:
    """What must stay the same for a verification to stay true."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    """0 for shared stores: each server numbers its mount of the share differently."""

    @classmethod
    def of(cls, result: os.stat_result, *, shared: bool = False) -> StatKey:
        dev = 0 if shared else result.st_dev
        return cls(result.st_size, result.st_mtime_ns, result.st_ctime_ns, result.st_ino, dev)

    def same_file(self, other: StatKey) -> bool:
        return (self.dev, self.ino) == (other.dev, other.ino)

    def changes(self, other: StatKey) -> list[str]:
        """Name each field that differs, for logs explaining why an identity was withdrawn."""
        fields = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
        return [name for name in fields if getattr(self, name) != getattr(other, name)]


def content_key(fd: int) -> tuple[int, int, int] | None:
    """Size, mtime and ctime of the open file ``fd`` (None if it cannot be looked at): what a
    session compares with its login's to know the image was not written since."""
    try:
        result = os.fstat(fd)
    except OSError:
        return None
    return result.st_size, result.st_mtime_ns, result.st_ctime_ns


@dataclasses.dataclass(frozen=True, slots=True)
class Verified:
    """The image with stat key ``stat`` matched a manifest whose tree has the top digest
    ``top`` (content only: a new version of the same bytes stays verified)."""

    stat: StatKey
    top: bytes


class ImageChanged(Exception):
    """The image changed while it was being read; the result describes no real state."""


def cache_path(image: Path) -> Path:
    return image.with_name(image.name.removesuffix(".img") + CACHE_SUFFIX)


def read_verified(image: Path) -> Verified | None:
    """The record beside ``image``, or None if there is none or it cannot be understood
    (records of the SHA-256 era have no top digest: they count as none)."""
    try:
        record = json.loads(cache_path(image).read_text(encoding="utf-8"))
        return Verified(StatKey(**record["stat"]), bytes.fromhex(record["top"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verified(image: Path, verified: Verified, *, log: FilteringBoundLogger) -> None:
    """Best effort: a read-only store still works, it only verifies again at the next start."""
    record = {
        "stat": dataclasses.asdict(verified.stat),
        "top": verified.top.hex(),
        "verified_at": time.time(),
    }
    try:
        write_atomically(cache_path(image), json.dumps(record, indent=2) + "\n")
    except OSError as error:
        log.warning(
            "verified_record_not_written",
            path=str(cache_path(image)),
            error=str(error),
            action="make the store directory writable, or accept a full check at every start",
        )


async def wait_until_settled(path: Path) -> None:
    """Start reading only once the image's ctime lies clearly in the past.

    File timestamps come from a coarse clock. A write landing in the same clock tick as the
    previous one, after we read that region, would leave the stat key unchanged and our
    verdict wrong for good. Once reading starts later than the last ctime plus a margin, any
    further write gets a newer ctime and is noticed. The wait is capped at the margin, so a
    server clock running ahead of ours (NFS) costs at most that.
    """
    age_ns = time.time_ns() - os.stat(path).st_ctime_ns
    if age_ns < SETTLE_NS:
        await asyncio.sleep((SETTLE_NS - max(age_ns, 0)) / 1e9)
