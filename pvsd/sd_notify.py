"""Telling systemd how the service is: readiness, status, watchdog (the sd_notify protocol).

A service started with ``Type=notify`` finds ``NOTIFY_SOCKET`` in its environment: a unix
datagram socket, a path or an abstract name written with a leading ``@``. Each message is
one datagram of ``NAME=VALUE`` lines: ``READY=1`` (started: units ordered after it may
start), ``STATUS=...`` (one line shown by ``systemctl status``), ``WATCHDOG=1``,
``STOPPING=1``. With ``WatchdogSec=`` systemd also sets ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``) and restarts the service when no ``WATCHDOG=1`` arrives for that long. The
pings are sent at half that by a task of the event loop, so a loop that is stuck (a
blocking call, a busy loop) stops them and gets the service restarted.

A few lines here rather than a library: ``sdnotify`` (0.3.2, 2017) hides every error behind a
bare ``except``, sends on a blocking socket (from the event loop here) and leaves its socket
unclosed when ``NOTIFY_SOCKET`` is unset (a ResourceWarning, an error under our tests);
``systemd-python`` builds against libsystemd's headers and ``cysystemd`` needs a compiler.
The protocol is one datagram per message.

Used by pvsd and by ``pvs-target attach``. The decisions (what to send when) are the pure
`Announcer`; `supervise` is its loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from pvsd.server import StreamServer

log = structlog.get_logger("pvsd.sd_notify")

STARTING_POLL = 0.1
"""How often readiness is looked at until it is reached."""
STATUS_POLL = 2.0
"""How often the status line is looked at (and sent if it changed) once ready."""

Status = Callable[[], tuple[bool, str]]
"""Whether the service is ready now, and a one-line status for ``systemctl status``."""


class Notifier:
    """The socket to the service manager. ``send`` never raises: systemd not listening must
    not stop the service (it only loses its status, and a failing watchdog shows why)."""

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None without one."""
        self.failures = 0
        self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier | None:
        """The notifier systemd asked for, or None when not started with Type=notify (or
        with a socket this does not speak, which is logged)."""
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        if not address.startswith(("/", "@")):
            log.warning("sd_notify_unsupported", address=address[:100],
                        hint="NOTIFY_SOCKET is neither a path nor an abstract name: no "
                        "readiness or watchdog; use Type=exec for this unit")
            return None
        return cls(address, watchdog_interval(environ, os.getpid() if pid is None else pid))

    def send(self, *lines: str) -> bool:
        """One message (the lines together); False if it could not be sent."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            self.failures += 1
            if self.failures & (self.failures - 1) == 0:  # 1st, 2nd, 4th...: no log flood
                log.warning(
                    "sd_notify_failed", error=str(error), failures=self.failures,
                    message=lines[0] if lines else "",
                    hint="systemd's notification socket does not take our messages: readiness "
                    "and the watchdog fail with it (check NotifyAccess=main in the unit)",
                )
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC``, if the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None
    return int(usec) / 2e6


class Announcer:
    """What to tell the service manager, given the time and the service's status: READY=1
    once ready (again only if it was not delivered), STATUS= when the line changes,
    WATCHDOG=1 every interval."""

    def __init__(self, watchdog_interval: float | None) -> None:
        self.watchdog_interval = watchdog_interval
        self.ready = False
        self._status = ""
        self._ping_due = 0.0

    def messages(self, now: float, ready: bool, status: str) -> list[str]:
        lines = []
        if ready and not self.ready:
            self.ready = True
            lines.append("READY=1")
        if status != self._status:
            self._status = status
            lines.append(f"STATUS={status}")
        if self.watchdog_interval is not None and now >= self._ping_due:
            self._ping_due = now + self.watchdog_interval
            lines.append("WATCHDOG=1")
        return lines

    def undelivered(self, lines: list[str]) -> None:
        """A message could not be sent (the manager's queue was full, say): readiness and
        status are said again at the next look. A lost ping is not: the next one comes
        within half the watchdog timeout anyway."""
        if "READY=1" in lines:
            self.ready = False
        if any(line.startswith("STATUS=") for line in lines):
            self._status = ""

    def wait(self, now: float) -> float:
        """Seconds until the next look."""
        wait = STATUS_POLL if self.ready else STARTING_POLL
        if self.watchdog_interval is not None:
            wait = min(wait, max(0.0, self._ping_due - now))
        return wait


async def supervise(notifier: Notifier | None, status: Status) -> None:
    """Until cancelled: readiness, status and watchdog pings; closes the notifier at the
    end. Without one (not started by systemd with Type=notify) there is nothing to do."""
    if notifier is None:
        return
    announcer = Announcer(notifier.watchdog_interval)
    loop = asyncio.get_running_loop()
    try:
        while True:
            ready, line = status()
            lines = announcer.messages(loop.time(), ready, line)
            if lines and not notifier.send(*lines):
                announcer.undelivered(lines)
            elif "READY=1" in lines:
                log.info("sd_notify_ready", status=line,
                         watchdog_seconds=notifier.watchdog_interval)
            await asyncio.sleep(announcer.wait(loop.time()))
    finally:
        notifier.close()


def stopping(notifier: Notifier | None, status: str) -> None:
    """Shutting down: systemd shows the unit as deactivating, not as failing."""
    if notifier is not None:
        notifier.send("STOPPING=1", f"STATUS={status}")


# -- pvsd's readiness ------------------------------------------------------------------------


def join_limit(heartbeat_interval: float, peer_timeout: float, inventory_interval: float) -> float:
    """How long pvsd waits to hear its peers before it says it is ready without some: a
    peer that runs is heard within peer_timeout, and its inventory follows within
    inventory_interval (a peer sends it that often), give or take a heartbeat tick; one not
    heard by then is down as far as the site can tell."""
    return peer_timeout + inventory_interval + heartbeat_interval


def pvsd_readiness(
    *, state: str, peers: int, joined: int, up: int, targets: int, waited: float, limit: float
) -> tuple[bool, str]:
    """Ready: the stream service listens (and the admin API, started before this is asked)
    and the server has joined the site: it has heard every configured peer's heartbeat and
    inventory, so that it places logins with the whole site in view, or ``limit`` has
    passed (see `join_limit`)."""
    if state == "stopping":
        return False, f"stopping: moving {targets} target(s) to other servers"
    if state == "stopped":
        return False, "stream service stopped (pvsctl start-stream starts it)"
    if joined < peers and waited < limit:
        return False, f"joining the site: heard {joined} of {peers} peer(s)"
    site = f"{up} of {peers} peer(s) up" if peers else "no peers"
    return True, f"serving {targets} target(s); {site}"


class PvsdStatus:
    """`pvsd_readiness` of the running server, for `supervise`."""

    def __init__(self, server: StreamServer, started: float) -> None:
        self.server = server
        self.started = started
        """Loop time when the server listened."""
        config = server.config
        self.limit = join_limit(
            config.heartbeat_interval, config.peer_timeout, config.inventory_interval
        )

    def __call__(self) -> tuple[bool, str]:
        site = self.server.site
        peers = list(site.peers.values()) if site is not None else []
        return pvsd_readiness(
            state=self.server.state.value,
            peers=len(self.server.config.peers) if site is not None else 0,
            joined=sum(1 for p in peers if p.up and p.inventory_generation >= 0),
            up=sum(1 for p in peers if p.up),
            targets=sum(1 for s in self.server.sessions if s.streaming),
            waited=asyncio.get_running_loop().time() - self.started, limit=self.limit,
        )
