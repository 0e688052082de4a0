"""A vDisk stream that survives its server: relogin on notice, failover on loss, retry.

Whoever reads through a ``VDiskStream`` never sees a server go away. Every decision (when a
server is gone, where to log in, when to give up) is made by the pure state machine of
``pvs_target/failover_core.py``; this module is its asyncio supervisor: it owns the stream's
tasks in one TaskGroup, carries the core's actions out on real sessions, and feeds it what
happens (logins answered, connections lost, RELOGIN and SITE notices, frames heard, the age
of the oldest request in flight).

Three paths lead to a new session, all ending in a login pinned to the identity the target
streamed first, so the bytes can never change under it:
- Planned: the server sends RELOGIN. The target logs in elsewhere while the old server goes on
  answering, switches new requests over, and leaves the old one once its replies are in.
- Unplanned: the connection breaks, no whole frame arrives for ``dead_after``, or a request
  stays unanswered past its deadline (a server that talks but does not serve). Every request
  in flight is sent again on the next session; reads are idempotent, so nothing is lost or
  doubled.
- No failover (load balancing off, Private Image on local storage, maintenance): the target
  waits for its one server and retries with backoff; status says why.
With ``give_up_after`` > 0, requests fail with one clear error after that long without a
server, and fail at once from then on until a server returns, when the stream resumes by
itself; the default (0) waits for ever, because a machine would rather hang than crash.

Every block read from a Standard Image (a read-only session) is checked against the manifest
root pinned at the first login (``pvs_target/verify.py``) before it is handed out. A server
that sends a block or a digest page that fails is told (DAMAGED), dropped for this vDisk for
as long as the target runs, and the read is done again on the next server. A Private Image's
manifest changes with every write, so its sessions are not verified: there the one writer's
lock keeps the bytes consistent.

Waits are measured where the user sees them: from a request's arrival (at the NBD export, or
at ``read``) to its answer, so ``longest_wait_ms`` and each failover's wait are the truth.
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
from pvs_target import failover_core as core
from pvs_target.connection import ClientError, ConnectionLost, Done, Reply, ServerError
from pvs_target.login import LoginError, Session, login
from pvs_target.verify import BlockMismatch, DigestsUnknown, ReadVerifier

T = TypeVar("T")
LEAVE_TIMEOUT = 1.0
"""How long ``close`` lets connections it gave up finish sending before it drops them."""


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverSettings:
    keepalive_interval: float = 0.5
    """Send a KEEPALIVE after this long without a whole frame from the server."""
    dead_after: float = 1.5
    """A server from which no whole frame arrives this long is gone: fail over."""
    request_timeout: float = 0.0
    """A request unanswered this long means the server is failing this target, whatever else
    it sends: fail over and send it again elsewhere. 0: ``dead_after``."""
    connect_timeout: float = 1.0
    """Per login attempt: a server that does not answer quickly is skipped."""
    retry_min: float = 0.05
    retry_max: float = 2.0
    avoid_for: float = 5.0
    """After losing a server, ask login servers to avoid it for this long (longer than the
    site's peer timeout, so that the site has noticed by then), or until it is heard serving."""
    give_up_after: float = 0.0
    """Seconds without any server before requests fail; 0 waits for ever."""
    max_request: int = 1 << 20
    checksum: bool = True

    def core(self) -> core.Settings:
        return core.Settings(
            keepalive_interval=self.keepalive_interval, dead_after=self.dead_after,
            request_timeout=self.request_timeout, connect_timeout=self.connect_timeout,
            retry_min=self.retry_min, retry_max=self.retry_max, avoid_for=self.avoid_for,
            give_up_after=self.give_up_after,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class FailoverRecord:
    at: float
    """Wall-clock time the old server was last known to serve (or asked us to move)."""
    from_server: str
    from_address: str
    to_server: str
    to_address: str
    reason: str
    took_ms: float
    """From the last moment the old server was known to serve to having the new session:
    the silence before the loss was noticed is included."""
    detected_after_ms: float = 0.0
    """How long the loss took to notice."""
    in_flight: int = 0
    """Requests in flight on the old session when it was lost."""
    longest_wait_ms: float = 0.0
    """The longest any request in progress during this failover waited, from its arrival to
    its answer."""
    lost_mono: float = dataclasses.field(default=0.0, repr=False)
    switched_mono: float = dataclasses.field(default=0.0, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "from": {"name": self.from_server, "address": self.from_address},
            "to": {"name": self.to_server, "address": self.to_address},
            "reason": self.reason,
            "took_ms": round(self.took_ms, 1),
            "detected_after_ms": round(self.detected_after_ms, 1),
            "in_flight": self.in_flight,
            "longest_wait_ms": round(self.longest_wait_ms, 1),
        }


class GaveUp(ClientError):
    """No server for longer than ``give_up_after``: the request fails instead of waiting on."""


class VDiskStream:
    def __init__(
        self,
        servers: list[str],
        vdisk: str,
        device_id: str,
        *,
        settings: FailoverSettings | None = None,
        log: FilteringBoundLogger | None = None,
        wait_for_first: bool = True,
        pin: ReplicaIdentity | None = None,
    ) -> None:
        """``wait_for_first``: retry the first login like a failover (a machine booting
        while its servers start); False fails ``open`` at once (a one-off copy). ``pin``: the
        first login already asks for this exact version (a machine whose kernel came from it)."""
        self.bootstrap = list(servers)
        self.wait_for_first = wait_for_first
        self.vdisk = vdisk
        self.device_id = device_id
        self.settings = settings or FailoverSettings()
        self.log = (log or structlog.get_logger("pvs_target")).bind(vdisk=vdisk)
        self.core = core.FailoverCore(self.bootstrap, self.settings.core())
        self.session: Session | None = None
        """The session requests go to; None while there is none."""
        self.last_session: Session | None = None
        """The latest session, kept while we wait for the next: it says what we stream."""
        self.identity: ReplicaIdentity | None = pin
        self.verification: ReadVerifier | None = None
        """Checks every block read, once the first login was to a read-only image."""
        self.history: list[FailoverRecord] = []
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = 0
        self.retried = 0
        self.longest_wait_ms = 0.0
        self._sessions: dict[int, Session] = {}
        """Every session alive by key: the current one, and old ones draining."""
        self._leaving: set[Session] = set()
        """Sessions given up whose connection has not closed yet (``StreamConnection.end``
        lets a DAMAGED report and GOODBYE out first): ``close`` must not leave them open."""
        self._keys = itertools.count(1)
        self._ready = asyncio.Event()
        """Set while requests can proceed: a session is current, or we gave up (they fail)."""
        self._gave_up: GaveUp | None = None
        self._wake = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Log in for the first time (retrying like a failover); the supervisor then runs
        until ``close``. Raises LoginError if the vDisk cannot be streamed at all."""
        self._opened = self._loop.create_future()
        self._main = self._loop.create_task(self._supervise(), name=f"stream {self.vdisk}")
        try:
            await asyncio.shield(self._opened)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        main, self._main = self._main, None
        self._carry_out(self.core.close())
        if main is not None:
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
        for session in list(self._sessions.values()):
            await session.close()
        self._sessions.clear()
        self.session = None
        for session in list(self._leaving):  # ended ones still sending their last words
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LEAVE_TIMEOUT):
                    await session.connection.wait_closed()
            session.connection.abort(force=True)
        self._leaving.clear()

    async def _supervise(self) -> None:
        """Owner of every task of the stream: logins and drains run in its TaskGroup, and it
        calls the core's ``tick`` whenever the core's timer is due."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._carry_out(self.core.start(self._loop.time()))
                while True:
                    self._wake.clear()  # events from here on wake us to look at the timer
                    due = self.core.next_timer()
                    timeout = None if due is None else max(0.0, due - self._loop.time())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await self._wake.wait()
                    self._probe()
                    self._carry_out(self.core.tick(self._loop.time()), wake=False)
        finally:
            self._tasks = None

    def _probe(self) -> None:
        """Tell the core what the current session's connection saw since the last tick."""
        key, session = self.core.session, self.session
        if key is None or session is None:
            return
        connection = session.connection
        self.core.heard(connection.last_heard, key)
        self.core.requests(key, connection.oldest_sent, connection.in_flight)

    @property
    def _opening(self) -> bool:
        """``open`` has not returned yet: a failure now is raised to its caller."""
        return self._opened is not None and not self._opened.done()

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

    @property
    def state(self) -> str:
        return self.core.state.value

    @property
    def waiting_reason(self) -> str:
        return self.core.waiting_reason

    @property
    def known_servers(self) -> list[str]:
        return self.core.known

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
            else:
                self.retried += 1  # the export sends it again with ``read``
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
                self.retried += 1  # the export sends it again with ``read``
                done(result)
                return
            assert isinstance(result, bytes | bytearray)  # READ_DATA, decoded by the protocol
            try:
                data = verification.accept(connection, start, result, offset, length)
            except BlockMismatch as error:
                self._mismatch(session, error)
                self.retried += 1
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
        """Run ``request`` on the current session; when that session is lost, wait for the
        next one and run it again there."""
        self.requests += 1
        began = self._loop.time()
        retried = False
        while True:
            session = await self._current()
            sent = self._loop.time()
            try:
                result = await request(session)
            except ServerError as error:
                if not error.retryable:
                    raise
                self._lost(session, f"server error {error.code.name}: {error.message}",
                           since=sent)
            except ConnectionLost as error:
                self._lost(session, str(error))
            except BlockMismatch as error:
                self._mismatch(session, error)
            else:
                self.waited(began, self._loop.time())
                return result
            if not retried:
                retried = True
                self.retried += 1

    async def _current(self) -> Session:
        while True:
            if self._gave_up is not None:
                # a new exception each time: one raised again and again grows its traceback
                raise GaveUp(str(self._gave_up))
            session = self.session
            if session is not None and session.connection.is_open:
                return session
            if session is not None:
                failure = session.connection.failure
                self._lost(session, str(failure or "connection closed"))
            await self._ready.wait()

    def waited(self, started: float, ended: float) -> None:
        """A request that arrived at ``started`` was answered at ``ended`` (loop time): keep
        the longest wait, overall and for the failover it overlapped."""
        ms = (ended - started) * 1000
        if ms > self.longest_wait_ms:
            self.longest_wait_ms = ms
        if self.history:
            record = self.history[-1]
            if (
                ms > record.longest_wait_ms
                and started <= record.switched_mono and ended >= record.lost_mono
            ):
                self.history[-1] = dataclasses.replace(record, longest_wait_ms=ms)

    # -- events from sessions ----------------------------------------------------------------

    def _key_of(self, session: Session) -> int | None:
        for key, candidate in self._sessions.items():
            if candidate is session:
                return key
        return None

    def _lost(
        self, session: Session, reason: str, *, drop: bool = False, since: float | None = None
    ) -> None:
        key = self._key_of(session)
        if key is None:
            return
        self._carry_out(self.core.lost(
            self._loop.time(), key, reason, drop=drop, since=since,
            in_flight=session.connection.in_flight or session.connection.in_flight_at_failure,
        ))

    def _mismatch(self, session: Session, error: BlockMismatch) -> None:
        """``session``'s server sent a bad block or page (and was told with DAMAGED): drop
        it for this vDisk, end its connection with GOODBYE (which still lets the report
        out), and fail over."""
        if self.verification is not None:
            self.verification.record(error)
        key = self._key_of(session)
        if key is None:
            return
        self.core.drop(key, str(error))
        in_flight = session.connection.in_flight
        session.connection.end(  # the core hears of the loss from on_closed, or here
            ErrorCode.NO_IDENTICAL_REPLICA, f"block {error.block} does not match the manifest"
        )
        self._carry_out(self.core.lost(self._loop.time(), key, str(error), in_flight=in_flight))

    def _on_closed(self, key: int, failure: ClientError) -> None:
        session = self._sessions.get(key)
        if session is None:
            return
        if key != self.core.session:
            self._sessions.pop(key, None)  # an old session drained or ended: nothing lost
            return
        self._carry_out(self.core.lost(
            self._loop.time(), key, str(failure),
            in_flight=session.connection.in_flight_at_failure,
        ))

    def _on_relogin(self, key: int, notice: ev.Relogin) -> None:
        self._carry_out(self.core.relogin(
            self._loop.time(), key, notice.deadline_ms, notice.site, notice.reason,
        ))

    def _on_site(self, key: int, update: ev.SiteUpdate) -> None:
        self.core.site(key, update.site)

    # -- carrying actions out ----------------------------------------------------------------

    def _carry_out(self, actions: list[core.Action], *, wake: bool = True) -> None:
        for action in actions:
            match action:
                case core.Login():
                    self._spawn(self._login(action), f"login {action.attempt}")
                case core.Switch(key):
                    self._switch(key)
                case core.Abandon(key, reason):
                    self._abandon(key, reason)
                case core.Nudge(key):
                    session = self._sessions.get(key)
                    if session is not None:
                        session.connection.nudge()
                case core.Drain(key, until):
                    session = self._sessions.get(key)
                    if session is not None:
                        self._spawn(self._drain(key, session, until), f"drain {key}")
                case core.FailWaiting(message):
                    self._fail_waiting(message)
                case core.Record():
                    self._record(action)
                case core.Note(event, level, fields):
                    if level == "error" and self._opening:
                        level = "info"  # open() raises it, and its caller says it: once
                    getattr(self.log, level)(event, **dict(fields))
        if wake:
            self._wake.set()  # the core's timer may have moved: the supervisor looks again

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        if self._tasks is None:
            if asyncio.iscoroutine(work):
                work.close()
            return
        self._tasks.create_task(self._guarded(work), name=name)

    async def _guarded(self, work: Awaitable[None]) -> None:
        """A task of the stream: a bug in one is logged, not allowed to end the others."""
        try:
            await work
        except Exception as error:  # the supervisor must outlive a bug in one task
            self.log.exception("internal_error", error=repr(error))

    async def _login(self, action: core.Login) -> None:
        first = self.last_session is None
        try:
            session = await login(
                list(action.servers), self.vdisk, self.device_id,
                pinned=self._pin(), max_request=self.settings.max_request,
                checksum=self.settings.checksum, connect_timeout=action.timeout,
                log=self.log, avoid=action.avoid, direct=action.direct,
            )
        except LoginError as error:
            # unknown vDisk, or another writer has it, at the very first login: say so
            final = first and (
                not error.retryable or error.code is ErrorCode.BUSY or not self.wait_for_first
            )
            if final and self._opened is not None and not self._opened.done():
                self._opened.set_exception(error)  # open() raises the login's own error
            self._carry_out(self.core.login_failed(
                self._loop.time(), action.attempt, error.message, retryable=not final,
                no_identical=error.code is ErrorCode.NO_IDENTICAL_REPLICA,
            ))
            return
        key = next(self._keys)
        self._sessions[key] = session
        connection = session.connection
        connection.on_relogin = lambda notice: self._on_relogin(key, notice)
        connection.on_site = lambda update: self._on_site(key, update)
        connection.on_closed = lambda failure: self._on_closed(key, failure)
        self._carry_out(self.core.logged_in(self._loop.time(), action.attempt, core.SessionInfo(
            key, session.server_name, session.connected_to, session.login_server,
            ev.LoginFlag.FAILOVER in session.flags, session.site,
        )))
        if not connection.is_open:  # it ended before the core took it
            self._on_closed(key, connection.failure or ConnectionLost("connection closed"))

    def _pin(self) -> ReplicaIdentity | None:
        """Pin the identity of a read-only image; a Private Image changes with our own
        writes, so there the one writer's lock, not the identity, keeps it consistent."""
        last = self.last_session
        if last is not None and not last.read_only:
            return None
        return self.identity

    def _switch(self, key: int) -> None:
        session = self._sessions[key]
        if self.last_session is None:  # the first session: what we stream from now on
            self.identity = session.identity
            if session.read_only:  # pinned for good: every later login is pinned to it
                self.verification = ReadVerifier(session.identity, log=self.log)
        self.session = self.last_session = session
        self._gave_up = None
        self._ready.set()
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)

    def _abandon(self, key: int, reason: str) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        if session is self.session:
            self.session = None
            self._ready.clear()
        session.connection.abort()  # every request still on it fails now and is retried
        if session.connection.is_closing:
            self._leaving.add(session)  # an ended one may still be sending DAMAGED, GOODBYE

    async def _drain(self, key: int, old: Session, until: float) -> None:
        """Let the old session answer what it was asked, until its deadline, then leave it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, until - self._loop.time())):
                while old.connection.in_flight and old.connection.is_open:
                    await asyncio.sleep(0.01)
        self._sessions.pop(key, None)
        await old.close()

    def _fail_waiting(self, message: str) -> None:
        self._gave_up = GaveUp(f"{self.vdisk}: {message}")
        self._ready.set()  # waiting requests wake up and fail
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(self._gave_up)

    def _record(self, record: core.Record) -> None:
        now = self._loop.time()
        wall = time.time() - (now - record.lost_at)
        self.history.append(FailoverRecord(
            wall, record.from_server, record.from_address, record.to_server,
            record.to_address, record.reason, record.took * 1000,
            record.detected_after * 1000, record.in_flight,
            lost_mono=record.lost_at, switched_mono=now,
        ))
        self.log.info(
            "failover_done", to=record.to_server, address=record.to_address,
            took_ms=round(record.took * 1000, 1),
            detected_after_ms=round(record.detected_after * 1000, 1),
            in_flight=record.in_flight, reason=record.reason,
        )

    # -- status -------------------------------------------------------------------------------

    def _no_failover_reason(self, session: Session) -> str:
        if Mode.from_code(session.mode) is Mode.private:
            return "Private Image on local storage"
        return "load balancing off or maintenance: one server provides it"

    def status(self) -> dict[str, Any]:
        session = self.session
        last = self.last_session
        identity = self.identity
        decisions = self.core.snapshot()
        status: dict[str, Any] = {
            "vdisk": self.vdisk,
            "device_id": self.device_id,
            "state": decisions["state"],
            "waiting_reason": decisions["waiting_reason"],
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
            "known_servers": decisions["known_servers"],
            "avoiding": decisions["avoiding"],
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "requests": self.requests,
            "in_flight": session.connection.in_flight if session else 0,
            "retried_requests": self.retried,
            "longest_wait_ms": round(self.longest_wait_ms, 1),
            "gave_up": str(self._gave_up) if self._gave_up is not None else None,
            "failovers": [record.to_json() for record in self.history],
            "verification": (
                self.verification.status() if self.verification is not None
                else {"enabled": False, "reason": "Private Image: its manifest changes with "
                      "every write, so blocks are not checked" if last else "not logged in"}
            ),
        }
        return status
