"""A vDisk stream that survives its server: relogin on notice, failover on loss, retry.

Whoever reads through a ``VDiskStream`` never sees a server go away. Three paths lead to a new
session, all ending in a login pinned to the identity the target streamed first, so the bytes
can never change under it:
- Planned: the server sends RELOGIN. The target logs in elsewhere while the old server goes on
  answering, switches new requests over, and leaves the old one once its replies are in. No
  read waits.
- Unplanned: the connection breaks, or the server falls silent for ``dead_after`` seconds (we
  send a KEEPALIVE every ``keepalive_interval`` when nothing else flows). Every read in flight
  is retried on the next session; reads are idempotent, so nothing is lost or doubled.
- No failover (load balancing off, Private Image on local storage, maintenance): the target
  waits for its one server and retries with backoff; status says why.
With ``give_up_after`` > 0, reads fail with a clear error after that long without a server;
the default (0) waits for ever, because a machine would rather hang than crash.

Every block read from a Standard Image (a read-only session) is checked against the manifest
root pinned at the first login (``pvs_target/verify.py``) before it is handed out. A server
that sends a block or a digest page that fails is told (DAMAGED), dropped for this vDisk for
as long as the target runs (never logged in to again: the login asks the site to avoid it,
and a login that lands there all the same is ended with GOODBYE), and the read is done again
on the next server. A Private Image's manifest changes with every write, so its sessions are
not verified: there the one writer's lock keeps the bytes consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol import events as ev
from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode
from pvs_target.connection import ClientError, ConnectionLost, Done, Reply, ServerError
from pvs_target.login import LoginError, Session, login
from pvs_target.verify import BlockMismatch, DigestsUnknown, ReadVerifier

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverSettings:
    keepalive_interval: float = 0.5
    """Send a KEEPALIVE after this long without traffic."""
    dead_after: float = 1.5
    """A server silent this long (no reply, no keepalive answer) is gone: fail over."""
    connect_timeout: float = 1.0
    """Per login attempt: a server that does not answer quickly is skipped."""
    retry_min: float = 0.05
    retry_max: float = 2.0
    avoid_for: float = 5.0
    """After losing a server, ask login servers to avoid it for this long (longer than the
    site's peer timeout, so that the site has noticed by then)."""
    give_up_after: float = 0.0
    """Seconds without any server before reads fail; 0 waits for ever."""
    max_request: int = 1 << 20
    checksum: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverRecord:
    at: float
    """Wall-clock time the old server was lost or asked us to move."""
    from_server: str
    from_address: str
    to_server: str
    to_address: str
    reason: str
    took_ms: float
    """From losing the old session to having the new one."""
    longest_wait_ms: float = 0.0
    """The longest any read waited because of this failover."""

    def to_json(self) -> dict[str, Any]:
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "from": {"name": self.from_server, "address": self.from_address},
            "to": {"name": self.to_server, "address": self.to_address},
            "reason": self.reason,
            "took_ms": round(self.took_ms, 1),
            "longest_wait_ms": round(self.longest_wait_ms, 1),
        }


class GaveUp(ClientError):
    """No server for longer than ``give_up_after``: the read fails instead of waiting on."""


class VDiskStream:
    def __init__(
        self,
        servers: list[str],
        vdisk: str,
        device_id: str,
        *,
        settings: FailoverSettings | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.bootstrap = list(servers)
        self.vdisk = vdisk
        self.device_id = device_id
        self.settings = settings or FailoverSettings()
        self.log = (log or structlog.get_logger("pvs_target")).bind(vdisk=vdisk)
        self.session: Session | None = None
        self.last_session: Session | None = None
        """The latest session, kept while we wait for the next: it says what we stream."""
        self.identity: ReplicaIdentity | None = None
        self.verification: ReadVerifier | None = None
        """Checks every block read, once the first login was to a read-only image."""
        self.history: list[FailoverRecord] = []
        self.known_servers: list[str] = list(servers)
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = 0
        self.retried = 0
        self.longest_wait_ms = 0.0
        self.waiting_reason = ""
        self.state = "starting"
        self._ready = asyncio.Event()
        self._gave_up: GaveUp | None = None
        self._lost_at = 0.0
        self._lost_wall = 0.0
        self._lost_from: Session | None = None
        self._crashed: tuple[str, str, float] | None = None
        """The server last lost without notice (address, name, when): its peers may take
        up to their peer timeout to notice, so for ``avoid_for`` it is tried last and a
        planned move asks login servers to avoid it."""
        self._lost_reason = ""
        self._event_wait_ms = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Log in for the first time (retrying like a failover), then watch the server."""
        self._lost_at = time.monotonic()
        await self._reconnect(None)
        self._own(self._monitor())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        self.state = "closed"

    # -- what the stream is -----------------------------------------------------------------

    @property
    def size(self) -> int:
        assert self.identity is not None, "open() first"
        return self.identity.size

    @property
    def block_size(self) -> int:
        assert self.last_session is not None, "open() first"
        return self.last_session.block_size

    @property
    def read_only(self) -> bool:
        assert self.last_session is not None, "open() first"
        return self.last_session.read_only

    @property
    def mode(self) -> Mode:
        assert self.last_session is not None, "open() first"
        return Mode.from_code(self.last_session.mode)

    @property
    def failover_allowed(self) -> bool:
        last = self.last_session
        return last is not None and ev.LoginFlag.FAILOVER in last.flags

    @property
    def max_request(self) -> int:
        return self.session.max_request if self.session else self.settings.max_request

    # -- requests ---------------------------------------------------------------------------

    def read_now(self, offset: int, length: int, done: Done) -> bool:
        """One READ sent at once on the current session, its answer to ``done`` (data, or the
        error that ended it); False when that cannot be (no session, too long, writing paused).
        No retry here: a caller does a failed one again with ``read``, which fails over."""
        session = self.session
        if session is None or length > session.max_request or self._gave_up is not None:
            return False
        verification = self._verifying(session)
        if verification is not None:
            return self._read_now_checked(session, verification, offset, length, done)

        def counted(result: Reply | ClientError) -> None:
            if not isinstance(result, BaseException):
                self.bytes_read += length
            done(result)

        if not session.connection.read_now(offset, length, counted):
            return False
        self.requests += 1
        return True

    def _read_now_checked(
        self, session: Session, verification: ReadVerifier, offset: int, length: int,
        done: Done,
    ) -> bool:
        """``read_now`` of a verified stream: only when the digests are known and the aligned
        range is one request (else ``read``, which fetches pages and splits), and the blocks
        are checked in the callback, the same loop turn they arrive in."""
        if offset < 0 or offset + length > verification.shape.size:
            return False
        start, span = verification.span(offset, length)
        if span > session.max_request or not verification.known(start, span):
            return False
        connection = session.connection

        def checked(result: Reply | ClientError) -> None:
            if isinstance(result, BaseException):
                done(result)
                return
            assert isinstance(result, bytes | bytearray)  # READ_DATA, decoded by the protocol
            try:
                data = verification.accept(connection, start, result, offset, length)
            except BlockMismatch as error:
                self._mismatch(session, error)
                done(error)  # the export reads it again with ``read``, on the next server
                return
            except DigestsUnknown as error:
                done(error)
                return
            self.bytes_read += length
            done(data)

        if not connection.read_now(start, span, checked):
            return False
        self.requests += 1
        return True

    def _verifying(self, session: Session) -> ReadVerifier | None:
        return self.verification if session.read_only else None

    def send_queued(self) -> None:
        """Send the requests queued in this loop turn now (see ``StreamConnection``)."""
        if self.session is not None:
            self.session.connection.send_queued()

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read any range; long ones are split into requests the server accepts, in parallel.
        A verified stream splits at multiples of a whole number of blocks, so that each part,
        widened to whole blocks, is still one request."""
        step = self.max_request
        end = offset + length
        verification = self.verification
        if verification is not None and self.read_only:
            block_size = verification.shape.block_size
            step = max(block_size, step - step % block_size)
            single = length <= 0 or offset // step == (end - 1) // step
            first_cut = (offset // step + 1) * step
        else:
            single = length <= step
            first_cut = offset + step
        if single:
            data = await self._retrying(lambda s: self._read_part(s, offset, length))
            self.bytes_read += length
            return data
        cuts = [offset, *range(first_cut, end, step), end]
        parts = await asyncio.gather(
            *(self.read(at, until - at) for at, until in itertools.pairwise(cuts))
        )
        return b"".join(parts)

    async def _read_part(self, session: Session, offset: int, length: int) -> bytes | bytearray:
        verification = self._verifying(session)
        if verification is None or offset < 0 or offset + length > verification.shape.size:
            # unverified, or out of range: the server refuses that, not the verifier
            return await session.connection.read(offset, length)
        return await verification.read(session.connection, offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        step = self.max_request
        view = memoryview(data)
        starts = range(0, len(view), step)
        await asyncio.gather(*(self._write_part(offset + i, view[i : i + step]) for i in starts))
        self.bytes_written += len(view)

    async def _write_part(self, offset: int, data: memoryview) -> None:
        await self._retrying(lambda s: s.connection.write(offset, data))

    async def flush(self) -> None:
        await self._retrying(lambda s: s.connection.flush())

    async def _retrying(self, request: Callable[[Session], Awaitable[T]]) -> T:
        """Run ``request`` on the current session; on loss, wait for the next one and retry."""
        self.requests += 1
        began = time.monotonic()
        retried = False
        while True:
            session = await self._current()
            try:
                result = await request(session)
            except ServerError as error:
                if not error.retryable:
                    raise
                self._lost(session, f"server error {error.code.name}: {error.message}")
            except ConnectionLost as error:
                self._lost(session, str(error))
            except BlockMismatch as error:
                self._mismatch(session, error)
            else:
                if retried:  # how long the caller waited, from its request to its answer
                    self._note_wait(time.monotonic() - began)
                return result
            if not retried:
                retried = True
                self.retried += 1

    async def _current(self) -> Session:
        while True:
            if self._gave_up is not None:
                raise self._gave_up
            session = self.session
            if session is not None and session.connection.is_open:
                return session
            if session is not None:
                self._lost(session, str(session.connection.failure or "connection closed"))
            await self._ready.wait()

    def _note_wait(self, seconds: float) -> None:
        ms = seconds * 1000
        self.longest_wait_ms = max(self.longest_wait_ms, ms)
        self._event_wait_ms = max(self._event_wait_ms, ms)
        if self.history and self.history[-1].longest_wait_ms < ms:
            self.history[-1] = dataclasses.replace(self.history[-1], longest_wait_ms=ms)

    # -- losing and finding servers -----------------------------------------------------------

    def _mismatch(self, session: Session, error: BlockMismatch) -> None:
        """``session``'s server sent a bad block or page (and was told with DAMAGED): drop
        it for this vDisk, end its connection with GOODBYE (which still lets the report
        out), and fail over."""
        if self.verification is not None:
            self.verification.record(error)
        session.connection.end(
            ErrorCode.NO_IDENTICAL_REPLICA, f"block {error.block} does not match the manifest"
        )
        self._lost(session, str(error))

    def _dropped(self, session: Session) -> bool:
        dropped = self.verification.dropped if self.verification is not None else {}
        return session.server_name in dropped or session.connected_to in dropped.values()

    def _lost(self, session: Session, reason: str) -> None:
        """The session broke: drop it (once) and start looking for the next one."""
        if self.session is not session or self._closing:
            return
        self.session = None
        self._ready.clear()
        self._lost_at, self._lost_wall = time.monotonic(), time.time()
        self._lost_from, self._lost_reason = session, reason
        self._crashed = (session.connected_to, session.server_name, self._lost_at)
        self._event_wait_ms = 0.0
        self.state = "failing over" if self.failover_allowed_for(session) else "waiting"
        self.log.warning(
            "server_lost",
            server=session.server_name,
            address=session.connected_to,
            reason=reason,
            in_flight=session.connection.in_flight,
        )
        session.connection.abort()  # every read still on it fails now and is retried
        self._own(self._reconnect(session))

    @staticmethod
    def failover_allowed_for(session: Session) -> bool:
        return ev.LoginFlag.FAILOVER in session.flags

    async def _reconnect(self, old: Session | None) -> None:
        """Log in again, pinned to our identity, until it works (or we give up)."""
        delay = self.settings.retry_min
        started = time.monotonic()
        while not self._closing:
            servers, avoid, direct = self._plan(old)
            try:
                session = await login(
                    servers,
                    self.vdisk,
                    self.device_id,
                    pinned=self._pin(old),
                    max_request=self.settings.max_request,
                    checksum=self.settings.checksum,
                    connect_timeout=self.settings.connect_timeout,
                    log=self.log,
                    avoid=avoid,
                    direct=direct,
                )
            except LoginError as error:
                if old is None and (not error.retryable or error.code is ErrorCode.BUSY):
                    raise  # unknown vDisk, or another writer has it: say so, do not wait
                self.waiting_reason = self._why_waiting(old, error)
                waited = time.monotonic() - started
                give_up = self.settings.give_up_after
                if give_up and waited >= give_up:
                    self._gave_up = GaveUp(
                        f"no server could stream {self.vdisk} for {waited:.0f} s "
                        f"({self.waiting_reason}); reads fail from now on"
                    )
                    self.state = "gave up"
                    self.log.error("gave_up", seconds=round(waited), reason=self.waiting_reason)
                    self._ready.set()
                    return
                self.log.warning("relogin_failed", retry_in=round(delay, 2), error=error.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            if self._refuse_dropped(session):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            self._install(session, old)
            return

    def _refuse_dropped(self, session: Session) -> bool:
        """A login that landed on a server dropped for damage (redirected there by a site
        that has not withdrawn the replica yet): say GOODBYE and look again."""
        if not self._dropped(session):
            return False
        self.log.warning(
            "login_on_dropped_server", server=session.server_name,
            address=session.connected_to,
            action="said goodbye; logging in again elsewhere",
            hint="this server sent data that does not match the manifest earlier",
        )
        session.connection.end(ErrorCode.NO_IDENTICAL_REPLICA, "replica found damaged earlier")
        return True

    def _pin(self, old: Session | None) -> ReplicaIdentity | None:
        """Pin the identity of a read-only image; a Private Image changes with our own
        writes, so there the one writer's lock, not the identity, keeps it consistent."""
        if old is not None and not old.read_only:
            return None
        return self.identity

    def _plan(
        self, old: Session | None, first: tuple[str, ...] = (), *, planned: bool = False
    ) -> tuple[list[str], str, bool]:
        """Where to log in, never at a server dropped for damage (and the site asked to
        avoid the latest one, when no crashed server needs that more)."""
        servers, avoid, direct = self._plan_unchecked(old, first, planned=planned)
        dropped = self.verification.dropped if self.verification is not None else {}
        if dropped:
            servers = [server for server in servers if server not in dropped.values()]
            avoid = avoid or list(dropped)[-1]
        return servers, avoid, direct

    def _plan_unchecked(
        self, old: Session | None, first: tuple[str, ...] = (), *, planned: bool = False
    ) -> tuple[list[str], str, bool]:
        """Where to log in: the site (not the lost server) when failover is allowed, else
        straight back to the one server that provides the vDisk."""
        if old is None:
            return self.bootstrap, "", False
        if not self.failover_allowed_for(old):
            return [old.connected_to], "", True
        # servers the site says are serving first; the one we lost last. Ask the site to
        # avoid it only until its peers have had time to notice it is gone: after that,
        # their view is the better judge (it may be back, and the only one with our replica).
        now = time.monotonic()
        crashed = self._crashed
        if crashed is not None and (
            now - crashed[2] >= self.settings.avoid_for or crashed[0] == old.connected_to
        ):
            crashed = None
        last = [crashed[0]] if crashed else []  # a silent one costs a connect timeout
        others = [s for s in (*first, *self.known_servers) if s not in (old.connected_to, *last)]
        servers = [*dict.fromkeys(others), *last, old.connected_to]
        if planned and crashed is not None:
            # the stopping server refuses logins itself; the crashed one would only time out
            return servers, crashed[1], False
        recent = now - self._lost_at < self.settings.avoid_for
        return servers, old.server_name if recent else "", False

    def _why_waiting(self, old: Session | None, error: LoginError) -> str:
        if self.verification is not None and self.verification.dropped and not error.server:
            names = ", ".join(self.verification.dropped)
            return (
                f"every server left to try sent data that does not match the manifest "
                f"({names}): waiting for another one"
            )
        if old is not None and not self.failover_allowed_for(old):
            return (
                f"no failover for {self.vdisk} ({self._no_failover_reason(old)}): waiting for "
                f"{old.server_name} at {old.connected_to}"
            )
        if error.code is ErrorCode.NO_IDENTICAL_REPLICA:
            return "no serving server holds an identical replica: waiting for one"
        return f"no server answered: {error.message}"

    def _no_failover_reason(self, session: Session) -> str:
        mode = Mode.from_code(session.mode)
        if mode is Mode.private:
            return "Private Image on local storage"
        return "load balancing off or maintenance: one server provides it"

    def _learn(self, addresses: tuple[str, ...]) -> None:
        """Remember servers of the site, so that we can find it again if ours goes away."""
        for address in addresses:
            if address not in self.known_servers:
                self.known_servers.append(address)

    def _install(self, session: Session, old: Session | None) -> None:
        if self.identity is None:
            self.identity = session.identity
            if session.read_only:  # pinned for good: every later login is pinned to it
                self.verification = ReadVerifier(session.identity, log=self.log)
        self._learn((session.connected_to, session.login_server, *session.site))
        session.connection.on_relogin = lambda notice: self._on_relogin(session, notice)
        session.connection.on_closed = lambda failure: self._lost(session, str(failure))
        self.session = self.last_session = session
        self.state = "streaming"
        self.waiting_reason = ""
        took = (time.monotonic() - self._lost_at) * 1000
        if old is not None:
            record = FailoverRecord(
                self._lost_wall,
                old.server_name,
                old.connected_to,
                session.server_name,
                session.connected_to,
                self._lost_reason,
                took,
                self._event_wait_ms,
            )
            self.history.append(record)
            self.log.info(
                "failover_done",
                to=session.server_name,
                address=session.connected_to,
                took_ms=round(took, 1),
                reason=self._lost_reason,
            )
        self._ready.set()

    # -- planned moves ------------------------------------------------------------------------

    def _on_relogin(self, session: Session, notice: ev.Relogin) -> None:
        if self.session is session:
            self._own(self._move(session, notice))

    async def _move(self, old: Session, notice: ev.Relogin) -> None:
        """Log in elsewhere while ``old`` still serves; switch; then let ``old`` go."""
        self._lost_at, self._lost_wall = time.monotonic(), time.time()
        self._lost_reason = f"relogin requested: {notice.reason}"
        self._event_wait_ms = 0.0
        if not self.failover_allowed_for(old):
            return  # it will close; we then wait for it to come back
        self._learn(notice.site)
        until = time.monotonic() + notice.deadline_ms / 1000
        delay = self.settings.retry_min
        while True:  # keep trying until the deadline: the old server still serves meanwhile
            servers, avoid, _ = self._plan(old, first=notice.site, planned=True)
            left = until - time.monotonic()
            try:
                session = await login(
                    servers, self.vdisk, self.device_id, pinned=self._pin(old),
                    max_request=self.settings.max_request, checksum=self.settings.checksum,
                    connect_timeout=max(0.1, min(self.settings.connect_timeout, left)),
                    log=self.log, avoid=avoid,
                )
            except LoginError as error:
                self.log.warning("relogin_elsewhere_failed", error=error.message)
                if self.session is not old or time.monotonic() + delay >= until:
                    return  # the unplanned path takes over once the old server closes
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            if not self._refuse_dropped(session):
                break
            if self.session is not old or time.monotonic() + delay >= until:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_max)
        if self.session is not old:
            await session.close()
            return
        self._install(session, old)
        with contextlib.suppress(TimeoutError):  # let the old replies arrive, then goodbye
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                while old.connection.in_flight and old.connection.is_open:
                    await asyncio.sleep(0.01)
        await old.close()

    # -- watching the server ------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Keepalives, and the verdict that a silent server is gone."""
        interval = self.settings.keepalive_interval
        while True:
            await asyncio.sleep(interval / 2)
            session = self.session
            if session is None:
                continue
            connection = session.connection
            silent = asyncio.get_running_loop().time() - connection.last_heard
            if silent >= self.settings.dead_after:
                self._lost(session, f"no answer from the server for {silent:.1f} s")
            elif silent >= interval:
                connection.nudge()

    def _own(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("internal_error", error=repr(task.exception()))

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        session = self.session
        last = self.last_session
        identity = self.identity
        return {
            "vdisk": self.vdisk,
            "device_id": self.device_id,
            "state": self.state,
            "waiting_reason": self.waiting_reason,
            "identity": identity.to_json() if identity else None,
            "mode": self.mode.value if last else None,
            "read_only": last.read_only if last else None,
            "failover": self.failover_allowed,
            "no_failover_reason": (
                self._no_failover_reason(last) if last and not self.failover_allowed else ""
            ),
            "server": (
                {"name": session.server_name, "address": session.connected_to} if session else None
            ),
            "login_server": session.login_server if session else None,
            "known_servers": self.known_servers,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "requests": self.requests,
            "retried_requests": self.retried,
            "longest_wait_ms": round(self.longest_wait_ms, 1),
            "failovers": [record.to_json() for record in self.history],
            "verification": (
                self.verification.status() if self.verification is not None
                else {"enabled": False, "reason": "Private Image: its manifest changes with "
                      "every write, so blocks are not checked" if last else "not logged in"}
            ),
        }
