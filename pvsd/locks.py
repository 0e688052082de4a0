"""One writer per Private Image vDisk, across the whole site.

The lock is a small file beside the image (``NAME.lock``), so it lives wherever the vDisk
lives: on shared storage every server sees it. It names the server, session and device that
hold it. It is released when the writer's session ends, or taken over when its server has been
declared down by the site (a crashed server cannot release anything), so a writer never waits
a minute for a lock of the dead, as admins of older systems know too well. Lock files are never
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
    image: Path, owner: Owner, *, alive: Callable[[Owner], bool]
) -> None:
    """Take the lock for ``owner``; raise Busy if a live writer holds it."""
    path = lock_path(image)
    content = json.dumps(dataclasses.asdict(owner)).encode()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            holder = read_owner(image)
            if holder is None:
                continue  # released meanwhile: try again
            if alive(holder):
                raise Busy(
                    f"{image.stem} is a Private Image in use by device {holder.device!r} "
                    f"through server {holder.server} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.since))} UTC: "
                    "one writer at a time; detach that target first"
                ) from None
            log.warning(
                "lock_taken_over", vdisk=image.stem, old_server=holder.server,
                old_device=holder.device, reason="its holder is gone",
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
