"""Computing a vDisk's replica identity, and remembering it beside the image.

Hashing a large image takes minutes, and a vDisk without an identity cannot be served, so a
restarted pvsd must not hash again what it hashed before. The result is kept in
``NAME.identity.json`` together with the stat key of the file it was computed from, and trusted
only while the image still has that stat key. The key holds ctime because a user can set mtime
back after changing the content, but only the kernel sets ctime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Literal

from structlog.typing import FilteringBoundLogger

from pvs_protocol.identity import ReplicaIdentity
from pvsd.properties import write_atomically

CHUNK_SIZE = 4 * 1024 * 1024
"""Large enough that hashlib releases the GIL for nearly all of the work."""
CACHE_SUFFIX = ".identity.json"
SETTLE_NS = 100_000_000
"""How old the image's ctime must be before hashing starts; see `_wait_until_settled`."""


@dataclasses.dataclass(frozen=True, slots=True)
class StatKey:
    """What must stay the same for a computed identity to stay true."""

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


@dataclasses.dataclass(frozen=True, slots=True)
class Identified:
    identity: ReplicaIdentity
    stat: StatKey
    """The stat key of the file that was hashed."""
    source: Literal["computed", "cache", "relabelled"]
    """Where the identity came from: "relabelled" reused a cached digest under a new version."""


class ImageChanged(Exception):
    """The image changed while it was being hashed; the digest describes no real state."""


class _Abandoned(Exception):
    """The caller stopped waiting; the hashing thread ends early."""


def cache_path(image: Path) -> Path:
    return image.with_name(image.name.removesuffix(".img") + CACHE_SUFFIX)


async def compute_identity(
    path: Path, version: int, *, log: FilteringBoundLogger, progress_interval: float = 2.0
) -> ReplicaIdentity:
    """Hash the whole image, ignoring any cache."""
    identified = await _compute(path, version, log, progress_interval, shared=False)
    return identified.identity


async def load_identity(
    path: Path,
    version: int,
    *,
    log: FilteringBoundLogger,
    shared: bool = False,
    progress_interval: float = 2.0,
) -> Identified:
    """The identity from the cache if it still describes the image, else a fresh hash.

    A version change alone reuses the cached digest: the bytes are the same, only the label the
    administrator put on them changed, and hashing again would keep the vDisk offline for
    nothing.
    """
    current = StatKey.of(os.stat(path), shared=shared)
    cached = read_cache(path)
    if cached is not None and cached.stat == current:
        if cached.identity.version == version:
            log.info("identity_cached", path=str(path), identity=cached.identity.short)
            return cached
        identity = dataclasses.replace(cached.identity, version=version)
        log.info("identity_relabelled", path=str(path), identity=identity.short)
        identified = Identified(identity, current, "relabelled")
    else:
        identified = await _compute(path, version, log, progress_interval, shared=shared)
    write_cache(path, identified, log=log)
    return identified


def read_cache(image: Path) -> Identified | None:
    """The cached record, or None if there is none or it cannot be understood."""
    try:
        record = json.loads(cache_path(image).read_text(encoding="utf-8"))
        return Identified(
            ReplicaIdentity.from_json(record["identity"]), StatKey(**record["stat"]), "cache"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(image: Path, identified: Identified, *, log: FilteringBoundLogger) -> None:
    """Best effort: a read-only store still works, it only hashes again at the next start."""
    record = {
        "identity": identified.identity.to_json(),
        "stat": dataclasses.asdict(identified.stat),
    }
    try:
        write_atomically(cache_path(image), json.dumps(record, indent=2) + "\n")
    except OSError as error:
        log.warning(
            "identity_cache_not_written",
            path=str(cache_path(image)),
            error=str(error),
            action="make the store directory writable, or accept hashing at every start",
        )


async def _compute(
    path: Path,
    version: int,
    log: FilteringBoundLogger,
    progress_interval: float,
    *,
    shared: bool,
) -> Identified:
    await _wait_until_settled(path)
    stop = threading.Event()
    try:
        result, digest = await asyncio.to_thread(_hash_file, path, log, progress_interval, stop)
    finally:
        # Cancelling the await does not stop the thread; this does, at the next chunk.
        stop.set()
    key = StatKey.of(result, shared=shared)
    identity = ReplicaIdentity(version, key.mtime_ns, key.size, digest)
    log.info("identity_computed", path=str(path), identity=identity.short)
    return Identified(identity, key, "computed")


async def _wait_until_settled(path: Path) -> None:
    """Start reading only once the image's ctime lies clearly in the past.

    File timestamps come from a coarse clock. A write landing in the same clock tick as the
    previous one, after we read that region, would leave the stat key unchanged and our digest
    wrong for good. Once reading starts later than the last ctime plus a margin, any further
    write gets a newer ctime and is noticed. The wait is capped at the margin, so a server
    clock running ahead of ours (NFS) costs at most that.
    """
    age_ns = time.time_ns() - os.stat(path).st_ctime_ns
    if age_ns < SETTLE_NS:
        await asyncio.sleep((SETTLE_NS - max(age_ns, 0)) / 1e9)


def _hash_file(
    path: Path, log: FilteringBoundLogger, progress_interval: float, stop: threading.Event
) -> tuple[os.stat_result, bytes]:
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a FIFO must not hang us
    with open(os.open(path, flags), "rb", buffering=0) as file:
        before = os.fstat(file.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        log.info("identity_hashing", path=str(path), size=before.st_size)
        done = 0
        started = last_report = time.monotonic()
        while count := file.readinto(buffer):
            if stop.is_set():
                raise _Abandoned
            digest.update(view[:count])
            done += count
            now = time.monotonic()
            if now - last_report >= progress_interval:
                last_report = now
                log.info(
                    "identity_progress",
                    path=str(path),
                    percent=round(100 * done / max(before.st_size, 1), 1),
                    mb_per_s=round(done / (now - started) / 1e6, 1),
                )
        after = os.fstat(file.fileno())
    if StatKey.of(before) != StatKey.of(after) or done != before.st_size:
        raise ImageChanged(f"{path} changed while it was being hashed")
    return before, digest.digest()
