"""One attached target per socket path: claimed before use, released on exit.

A second ``pvs-target attach`` given the control or NBD socket path of a running one used to
remove that target's socket, bind its own, and delete it on exit, leaving the first target
unreachable (issue 13). Each unix socket path is now claimed before anything touches it:

- A lock file beside it (``PATH.lock``, ``flock``) is held for as long as the target runs: of
  two targets starting at once exactly one wins, and the lock of a target that crashed goes
  with its process, so there is no stale-lock guessing.
- The lock file says who holds it (pid, vDisk, device id), so the refusal names the target.
- A socket file already at the path is probed once the lock is ours: if something accepts a
  connection there (a target from before these locks, another program), the path is refused
  too; if nothing does, the file is a leftover of a crash and is removed.
- Whoever binds the socket keeps its identity (device and inode) and removes it on exit only
  if it is still that file (`identity`, `unlink_if_ours`).

The lock file is removed on release while still locked; a claimer that locked a file removed
meanwhile sees that its inode is no longer at the path and tries again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import stat
from typing import Any

import structlog

log = structlog.get_logger("pvs_target.sockets")

PROBE_TIMEOUT = 2.0
"""How long a socket found at a claimed path gets to accept a connection (and a control socket
to answer status) before it is taken for alive but busy, and refused."""
_ATTEMPTS = 20

Identity = tuple[int, int]
"""(st_dev, st_ino) of a file: what ``unlink_if_ours`` compares before removing it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a claim, as written into the lock file and shown in a refusal."""

    pid: int
    vdisk: str
    device_id: str

    def describe(self) -> str:
        return (f"the pvs-target attached to vDisk {self.vdisk!r} as device "
                f"{self.device_id!r} (pid {self.pid})")


class ClaimError(Exception):
    """The path cannot be ours; the message names it and says what to do."""


class SocketInUse(ClaimError):
    """The path is another target's (or another program's), named in the message."""


class SocketClaim:
    """The right to a unix socket path for as long as this process runs (see module doc)."""

    def __init__(self, path: str, option: str, lock_fd: int) -> None:
        self.path = path
        self.option = option
        self._lock_fd: int | None = lock_fd

    @classmethod
    def acquire(cls, path: str, option: str, holder: Holder) -> SocketClaim:
        """Claim ``path`` for ``option`` (``--control``, ``--nbd``); raise SocketInUse if it
        is another's, ClaimError if its directory cannot be used."""
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
            fd = _lock(path + ".lock", option, path)
        except OSError as error:
            where = error.filename or directory
            raise ClaimError(
                f"{option} {path}: cannot use {where}: {error.strerror or error}: run as a user "
                f"who may write {directory} (root for /run), or give another {option}"
            ) from None
        claim = cls(path, option, fd)
        try:
            _write_holder(fd, holder)
            _clear_the_way(path, option)
        except OSError as error:
            claim.release()
            raise ClaimError(f"{option} {path}: {error.strerror or error}: give another "
                             f"{option}") from None
        except BaseException:
            claim.release()
            raise
        return claim

    def release(self) -> None:
        """Give the path up: the lock file goes first (while still locked), then the lock."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path + ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + ".lock")
        finally:
            os.close(fd)


def identity(path: str) -> Identity | None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def unlink_if_ours(path: str, ours: Identity | None) -> bool:
    """Remove the socket file at ``path`` only if it is the one we bound (``ours``); another
    process's socket at the same path is left alone. True if removed.

    Call it before closing our listening socket: while that is open it holds its inode, so no
    new file can have the same identity (a closed one's inode may be reused at once)."""
    if ours is None or identity(path) != ours:
        if ours is not None:
            log.warning("socket_not_removed", path=path,
                        reason="another process's socket is at this path now")
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def _lock(lock_path: str, option: str, path: str) -> int:
    for _ in range(_ATTEMPTS):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = holder.describe() if holder else "another pvs-target that is starting"
            raise SocketInUse(
                f"{option} {path} is in use by {who}: stop that target first, or give this "
                f"one another {option}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock_path):
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the new one
    raise SocketInUse(f"{option} {path}: could not lock {lock_path} (it keeps being replaced)")


def _same_file(fd: int, path: str) -> bool:
    status = os.fstat(fd)
    return identity(path) == (status.st_dev, status.st_ino)


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(dataclasses.asdict(holder)).encode() + b"\n", 0)


def _read_holder(fd: int) -> Holder | None:
    try:
        data: Any = json.loads(os.pread(fd, 4096, 0) or b"null")
        return Holder(int(data["pid"]), str(data["vdisk"]), str(data["device_id"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # being written, or not ours


def _clear_the_way(path: str, option: str) -> None:
    """Refuse a path where something listens; remove a socket nobody listens on any more."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{option} {path} exists and is not a socket: remove it or give "
                          f"another {option}")
    who: str | None = None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            log.info("stale_socket_removed", path=path)
            return
        except (BlockingIOError, TimeoutError):
            pass  # listening, with its backlog full: alive
        except OSError as error:
            raise SocketInUse(f"{option} {path}: cannot tell whether it is in use "
                              f"({error.strerror}): give another {option}") from None
        else:
            who = _ask_who(probe) if option == "--control" else None
    raise SocketInUse(
        f"{option} {path} is in use by {who or 'a process that is listening on it'}: stop it "
        f"first, or give this one another {option}"
    )


def _ask_who(probe: socket.socket) -> str | None:
    """A control socket answers status with its vDisk and device id (a target from before
    lock files has no lock to tell us)."""
    try:
        probe.sendall(b'{"command": "status"}\n')
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 1 << 20:
            chunk = probe.recv(65536)
            if not chunk:
                break
            answer += chunk
        status = json.loads(answer)["status"]
        return (f"the pvs-target attached to vDisk {status['vdisk']!r} as device "
                f"{status['device_id']!r}")
    except (OSError, ValueError, TypeError, KeyError):
        return None


__all__ = ["ClaimError", "Holder", "SocketClaim", "SocketInUse", "identity", "unlink_if_ours"]
