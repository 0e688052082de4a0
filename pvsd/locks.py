"""One writer per Private Image vDisk, across the whole site.

The lock is a small file beside the image (``NAME.lock``), so it lives wherever the vDisk
lives: on shared storage every server sees it. It names the server, session and device that
hold it. It is released when the writer's session ends, or taken over when its holder is known
to be gone: its server declared down by the site, or crashed (its stream port refuses
connections and it fell silent, see ``StreamServer.probe_lock_holder``), since a crashed
server cannot release anything; a writer never waits a minute for a lock of the dead, as
admins of older systems know too well. A restarted pvsd releases the locks of its previous
life at start (`release_stale`). Lock files are never
replicated: copy ``NAME.img`` and ``NAME.vdisk.toml`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("pvsd.locks")


class Busy(Exception):
    """Someone else writes this vDisk; the message names them and what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class Owner:
    server: str
    session: int
    device: str
    since: float


def lock_path(image: Path) -> Path:
    return image.with_suffix(".lock")


def read_owner(image: Path) -> Owner | None:
    try:
        data = json.loads(lock_path(image).read_text())
        return Owner(str(data["server"]), int(data["session"]), str(data["device"]),
                     float(data["since"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Owner("?", 0, "?", 0.0)  # unreadable: treat as held, say so


def acquire(
    image: Path, owner: Owner, *, gone: Callable[[Owner], str | None]
) -> None:
    """Take the lock for ``owner``; raise Busy if a live writer holds it. ``gone(holder)``
    says why the holder is gone (logged with the take-over), or None while it may write."""
    path = lock_path(image)
    content = json.dumps(dataclasses.asdict(owner)).encode()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = read_owner(image)
            if holder is None:
                continue  # released meanwhile: try again
            reason = gone(holder)
            if reason is None:
                raise Busy(
                    f"{image.stem} is a Private Image in use by device {holder.device!r} "
                    f"through server {holder.server} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.since))} UTC: "
                    "one writer at a time; detach that target first"
                ) from None
            log.warning(
                "lock_taken_over", vdisk=image.stem, old_server=holder.server,
                old_device=holder.device, reason=reason,
            )
            path.unlink(missing_ok=True)
            continue
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        return
    raise Busy(f"{image.stem}: the writer lock keeps changing hands; retry")


def release(image: Path, session: int) -> None:
    """Drop the lock if this session still holds it."""
    holder = read_owner(image)
    if holder is not None and holder.session == session:
        with contextlib.suppress(FileNotFoundError):
            lock_path(image).unlink()


def release_server(image: Path, server: str) -> bool:
    """Drop a lock held through ``server`` (declared down); True if one was dropped."""
    holder = read_owner(image)
    if holder is None or holder.server != server:
        return False
    with contextlib.suppress(FileNotFoundError):
        lock_path(image).unlink()
    log.warning("lock_released_for_down_server", vdisk=image.stem, server=server)
    return True


def release_stale(store: Path, server: str) -> list[str]:
    """At start: drop every lock in ``store`` that names ``server`` (this pvsd, before it
    crashed or was killed). No session of this process holds it, and until it is gone a
    Private Image whose manifest a crash left torn cannot be repaired, nor written through
    another server before the site declares this one down. Returns the vDisks released."""
    released: list[str] = []
    try:
        candidates = sorted(store.glob("*.lock"))
    except OSError:
        return released
    for path in candidates:
        image = path.with_suffix(".img")
        holder = read_owner(image)
        if holder is None or holder.server != server:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        released.append(image.stem)
        log.warning(
            "lock_released_from_previous_run", vdisk=image.stem, store=str(store),
            old_device=holder.device, old_session=f"{holder.session:016x}",
            hint="this server was stopped without releasing it (crash, SIGKILL): the target "
            "that wrote through it logs in again",
        )
    return released
