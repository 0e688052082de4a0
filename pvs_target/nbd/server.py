"""The NBD export over asyncio: many clients, pipelined requests, one ``Backend``.

    server = await serve_nbd(backend, "unix:/run/pvs/win10.sock", "win10", log=log)
    ...
    server.close()
    await server.wait_closed()

Each connection is a ``BufferedProtocol`` around the sans-IO ``NbdServerConnection``: bytes are
received into one reusable buffer (``StreamReader.readexactly`` is ~5x slower for big payloads,
ANCHORS.md), every request runs as its own task (replies go out in completion order, as NBD
allows), and each reply leaves in one ``writelines`` so a header never waits for its payload
behind Nagle (TCP_NODELAY is set here too: asyncio does not always). A connection stops reading
while ``max_in_flight`` requests (or ``max_in_flight_bytes``) are being served or while the
transport's write buffer is above its high-water mark.

Bounds: a client must finish the handshake within ``handshake_timeout`` (10 s) or it is
dropped, and at most ``max_clients`` (128) connections are kept. One more arriving at the cap
takes the place of the oldest connection still in its handshake (a flood of idle connections
cannot lock a real client out: it finishes its handshake in milliseconds, before the flood has
pushed it out); when every connection is past its handshake, it is refused (closed at once).
1,100 idle TCP connections once used up the target's file descriptors, and with them its
control socket. Refusals, evictions and timeouts are logged at most once per
``QUIET_INTERVAL`` each, with how many happened since the last line.

Backend failures: ``OSError`` (``BackendError`` is one) maps its errno to the NBD error
(ENOSPC stays ENOSPC, EDQUOT/EFBIG become ENOSPC, unknown ones EIO); any other exception is
logged and answered with EIO. The connection and the server live on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol.buffers import Lent
from pvs_target.address import format_address, parse_address
from pvs_target.nbd import wire
from pvs_target.nbd.events import (
    Aborted,
    Command,
    Disconnect,
    ExportInfo,
    NbdProtocolError,
    NeedData,
    OptionHandled,
    Refused,
    TransmissionStarted,
)
from pvs_target.nbd.protocol import NbdServerConnection, Phase
from pvs_target.nbd.wire import CommandFlag, CommandKind

Data = bytes | bytearray | memoryview
RECEIVE_CHUNK = 256 * 1024
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
WRITE_BUFFER_LOW = 1024 * 1024
MAX_CLIENTS = 128
HANDSHAKE_TIMEOUT = 10.0
QUIET_INTERVAL = 10.0


class Backend(Protocol):
    """What the export serves. Reads and writes are byte-precise within ``0..size``."""

    @property
    def size(self) -> int: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def block_size(self) -> int:
        """Preferred I/O size (the vDisk's block size); a power of 2, at least 512."""
        ...
    @property
    def multi_conn(self) -> bool:
        """True when a FLUSH on one connection covers writes made on all of them."""
        ...

    async def read(self, offset: int, length: int) -> Data: ...
    async def write(self, offset: int, data: Data, fua: bool) -> None: ...
    async def flush(self) -> None: ...
    async def trim(self, offset: int, length: int) -> None: ...
    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None: ...

    # Optional: ``read_now(offset, length, done) -> bool``, a read without a coroutine:
    # ``done`` gets the data or an exception; False means ``read`` must be used. A failed one
    # is done again by ``read``, so it need not retry. ``submitted()`` is called after each
    # burst of commands (one receive's worth), for a backend that gathers them.
    # Optional: ``release(buffers)``, called with buffers ``read`` returned (``PoolBuffer``s
    # only) once the replies carrying them have been handed to the kernel whole, so the
    # backend may reuse them.
    # Optional: ``waited(started, ended)``, the loop times at which a command arrived and
    # its reply left: what the client waited, for a backend that reports waits.


class BackendError(OSError):
    """A backend failure with the errno to report (``errno.ENOSPC`` -> NBD ENOSPC...).

    ``offset``, where known, is where the failure happened (sent in an ERROR_OFFSET chunk)."""

    def __init__(self, errno_value: int, message: str, *, offset: int | None = None) -> None:
        super().__init__(errno_value, message)
        self.message = message
        self.offset = offset
        self.logged = False
        """The backend has logged this failure already (once for many requests)."""


def export_info(
    backend: Backend, export_name: str, *, description: str = "", minimum_block_size: int = 1
) -> ExportInfo:
    """The ``ExportInfo`` a backend implies. A backend may add ``fast_zero = True`` when its
    ``write_zeroes`` only touches metadata."""
    return ExportInfo(
        name=export_name,
        size=backend.size,
        read_only=backend.read_only,
        preferred_block_size=max(512, backend.block_size),
        minimum_block_size=minimum_block_size,
        multi_conn=backend.multi_conn,
        description=description,
        fast_zero=bool(getattr(backend, "fast_zero", False)),
    )


async def serve_nbd(
    backend: Backend,
    address: str,
    export_name: str,
    *,
    log: FilteringBoundLogger | None = None,
    description: str = "",
    minimum_block_size: int = 1,
    max_in_flight: int = 64,
    max_in_flight_bytes: int = 128 * 1024 * 1024,
    max_clients: int = MAX_CLIENTS,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> NbdServer:
    """Listen on ``address`` (``HOST:PORT``, port 0 for any, or ``unix:PATH``) and serve
    ``backend`` as the export ``export_name``; returns once listening."""
    export = export_info(
        backend, export_name, description=description, minimum_block_size=minimum_block_size
    )
    server = NbdServer(backend, export, log or structlog.get_logger(), max_in_flight,
                       max_in_flight_bytes, max_clients=max_clients,
                       handshake_timeout=handshake_timeout)
    await server._listen(address)
    return server


class NbdServer:
    """A listening export. ``close()`` stops accepting and ends each connection once its
    requests in flight are answered; ``wait_closed()`` waits for that."""

    def __init__(
        self, backend: Backend, export: ExportInfo, log: FilteringBoundLogger,
        max_in_flight: int, max_in_flight_bytes: int, *, max_clients: int = MAX_CLIENTS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        if max_in_flight < 1 or max_in_flight_bytes < 1:
            raise ValueError("max_in_flight and max_in_flight_bytes must be positive")
        if max_clients < 1 or not handshake_timeout > 0:
            raise ValueError("max_clients and handshake_timeout must be positive")
        self.backend = backend
        self.export = export
        self.max_in_flight = max_in_flight
        self.max_in_flight_bytes = max_in_flight_bytes
        self.address = ""
        """Where it listens: ``HOST:PORT`` (the real port) or ``unix:PATH``."""
        self.log = log
        self.connections: set[_ExportConnection] = set()
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self._handshaking: dict[_ExportConnection, None] = {}
        """Kept connections still in their handshake, oldest first."""
        self._serving: set[_ExportConnection] = set()
        """Kept connections past their handshake."""
        self.refused = 0
        """Connections refused at the cap (every kept one was past its handshake)."""
        self.evicted = 0
        """Connections in their handshake dropped to make room for a newer one."""
        self.handshake_timeouts = 0
        self._quiet: dict[str, tuple[float, int]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._unix_path: str | None = None
        self._closing = False

    async def _listen(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if not path:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/pvs/nbd.sock")
            _remove_stale_socket(path)
            self._server = await loop.create_unix_server(self._connection, path)
            self._unix_path = path
            self.address = f"unix:{path}"
        else:
            host, port = _parse_listen_address(address)
            self._server = await loop.create_server(
                self._connection, host, port, reuse_address=True
            )
            bound = self._server.sockets[0].getsockname()
            self.address = format_address(host, bound[1])
        self.log.info("nbd_listening", address=self.address, export=self.export.name,
                      size=self.export.size, read_only=self.export.read_only)

    def _connection(self) -> _ExportConnection:
        return _ExportConnection(self)

    @property
    def clients(self) -> int:
        """Connections kept (in their handshake or past it), at most ``max_clients``."""
        return len(self._handshaking) + len(self._serving)

    def status(self) -> dict[str, Any]:
        return {
            "address": self.address, "clients": self.clients,
            "in_handshake": len(self._handshaking), "max_clients": self.max_clients,
            "refused": self.refused, "evicted": self.evicted,
            "handshake_timeouts": self.handshake_timeouts,
        }

    def _admit(self, connection: _ExportConnection) -> bool:
        """Keep a new connection, making room at the cap by dropping the oldest one still
        in its handshake; or refuse it, when every kept connection is past its handshake."""
        if self.clients >= self.max_clients:
            if not self._handshaking:
                self.refused += 1
                self._say("nbd_connection_refused", max_clients=self.max_clients,
                          action=f"{self.max_clients} NBD clients are connected: close unused "
                          "ones, or raise --nbd-max-clients")
                return False
            oldest = next(iter(self._handshaking))
            self.evicted += 1
            self._say("nbd_handshake_evicted", max_clients=self.max_clients,
                      action="connections that do not finish the NBD handshake fill the "
                      "export: the oldest make room for new ones; look for what opens them")
            oldest.drop()
        self._handshaking[connection] = None
        return True

    def _handshake_done(self, connection: _ExportConnection) -> None:
        if connection in self._handshaking:
            del self._handshaking[connection]
            self._serving.add(connection)

    def _handshake_expired(self, connection: _ExportConnection) -> None:
        if connection in self._handshaking:
            self.handshake_timeouts += 1
            self._say("nbd_handshake_timeout", seconds=self.handshake_timeout,
                      action="a client connected and did not finish the NBD handshake in time; "
                      "it was dropped")
            connection.drop()

    def _forget(self, connection: _ExportConnection) -> None:
        self._handshaking.pop(connection, None)
        self._serving.discard(connection)

    def _say(self, event: str, **fields: Any) -> None:
        """One warning per kind of event and ``QUIET_INTERVAL``: a flood of connections makes
        a few lines, each with how many happened since the last (``since_last``)."""
        now = asyncio.get_running_loop().time()
        last, count = self._quiet.get(event, (float("-inf"), 0))
        if now - last < QUIET_INTERVAL:
            self._quiet[event] = (last, count + 1)
            return
        self._quiet[event] = (now, 0)
        self.log.warning(event, since_last=count + 1, **fields)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
        for connection in list(self.connections):
            connection.shutdown()
        self.log.info("nbd_closing", address=self.address, connections=len(self.connections))

    async def wait_closed(self, grace: float = 10.0) -> None:
        """Wait for every connection to end; after ``grace`` seconds drop those still open
        and cancel their requests."""
        connections = list(self.connections)
        waiters = [connection.closed.wait() for connection in connections]
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*waiters)
        except TimeoutError:
            for connection in connections:
                connection.abort()
            await asyncio.gather(*(c.closed.wait() for c in connections))
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


class _ExportConnection(asyncio.BufferedProtocol):
    """One client: feeds the state machine, runs each request as a task it owns."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server
        self._backend = server.backend
        self._log = server.log
        self._protocol = NbdServerConnection(server.export)
        self._chunk = memoryview(bytearray(RECEIVE_CHUNK))
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None] | _FastRead] = set()
        """Requests being served: tasks, and reads of the backend's ``read_now``."""
        self._read_now: Callable[[int, int, Callable[[Any], None]], bool] | None = getattr(
            self._backend, "read_now", None
        )
        self._submitted: Callable[[], None] | None = getattr(self._backend, "submitted", None)
        self._waited: Callable[[float, float], None] | None = getattr(
            self._backend, "waited", None
        )
        self._clock = asyncio.get_running_loop().time
        self._in_flight_bytes = 0
        self._lent: Lent | None = None
        """Read data in replies, given back to the backend once the transport is done."""
        self._write_paused = False
        self._reading_paused = False
        self._ending = False
        """No more requests are taken (DISC, ABORT, shutdown, protocol error, lost link)."""
        self._lost = False
        self._draining = False
        self._deadline: asyncio.TimerHandle | None = None
        """Drops the connection if its handshake is not finished in time."""
        self._dropped = False
        self.closed = asyncio.Event()
        self.requests = 0
        self._out: list[Data] = []
        """Replies queued in this iteration of the event loop (`_send`, `_flush`)."""
        self._flush_due = False

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        release = getattr(self._backend, "release", None)
        if release is not None:
            self._lent = Lent(
                release, self._transport, asyncio.get_running_loop(),
                limit=2 * WRITE_BUFFER_HIGH,  # what the transport may hold, and a burst more
            )
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ANCHORS.md
        peer = transport.get_extra_info("peername")
        self._log = self._log.bind(peer=str(peer) if peer else "unix")
        self._server.connections.add(self)
        self._log.debug("nbd_client_connected")
        if self._server._closing:
            self._ending = True
            transport.close()
            return
        if not self._server._admit(self):
            self.drop()
            return
        self._deadline = asyncio.get_running_loop().call_later(
            self._server.handshake_timeout, self._server._handshake_expired, self
        )
        self._send(self._protocol.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._chunk

    def buffer_updated(self, nbytes: int) -> None:
        if self._ending:
            return
        try:
            self._protocol.receive_data(self._chunk[:nbytes])
        except NbdProtocolError as error:
            self._protocol_error(error)
            return
        self._pump()

    def eof_received(self) -> bool | None:
        return None  # close; in-flight requests finish and their replies are dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._ending = True
        self._end_handshake()
        self._server._forget(self)
        if self._dropped:  # logged (or counted) by the server already
            self._maybe_closed()
            return
        self._log.info("nbd_client_disconnected", requests=self.requests,
                        in_flight=len(self._tasks), error=str(exc) if exc else None)
        self._maybe_closed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    # -- control ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server is stopping: answer what is in flight, then close. Requests that arrive
        meanwhile are refused with ESHUTDOWN (the protocol's shutdown mode), so the client
        learns why rather than seeing silence."""
        self._protocol.shutdown()
        if self._protocol.phase is not Phase.TRANSMISSION or not self._tasks:
            self._end()
        else:
            self._draining = True  # _request_done closes once the last reply is out

    def drop(self) -> None:
        """End a connection that has no request to finish (in its handshake, or refused):
        at once, and without a line of its own in the log."""
        self._dropped = True
        self._end_handshake()
        self._server._forget(self)
        self.abort()

    def _end_handshake(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def abort(self) -> None:
        self._ending = True
        if self._transport is not None:
            self._transport.abort()
        for task in list(self._tasks):  # a fast read leaves the set as it is cancelled
            task.cancel()
        if self._transport is None:
            self.closed.set()

    def _end(self) -> None:
        self._ending = True
        if self._transport is not None and not self._transport.is_closing():
            self._flush()
            self._transport.close()  # sends what is buffered first
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self._lost and not self._tasks and not self.closed.is_set():
            self._server.connections.discard(self)
            self.closed.set()

    # -- events -----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Take events while there is room for more requests; pause reading otherwise."""
        protocol = self._protocol
        server = self._server
        try:
            while not self._ending:
                if (
                    len(self._tasks) >= server.max_in_flight
                    or self._in_flight_bytes >= server.max_in_flight_bytes
                    or self._write_paused
                ):
                    self._pause_reading()
                    break
                event = protocol.next_event()
                if type(event) is Command:
                    self._start(event)
                elif type(event) is NeedData:
                    self._resume_reading()
                    break
                else:
                    self._handle(event)
        except NbdProtocolError as error:
            self._protocol_error(error)
            return
        if self._submitted is not None:
            self._submitted()
        outgoing = protocol.data_to_send()
        if outgoing:
            self._send(outgoing)

    def _handle(self, event: object) -> None:
        if isinstance(event, Refused):
            self._log.debug("nbd_request_refused", command=wire.command_name(event.kind),
                            offset=event.offset, length=event.length,
                            error=event.error.name, detail=event.message)
            self._send(self._protocol.reply_error(
                event.handle, event.kind, event.error, event.message))
        elif isinstance(event, OptionHandled):
            self._log.debug("nbd_option", option=wire.option_name(event.option),
                            reply=wire.Reply(event.reply).name, detail=event.message)
        elif isinstance(event, TransmissionStarted):
            self._end_handshake()
            self._server._handshake_done(self)
            self._log.info("nbd_transmission_started", export=event.export_name,
                           via=wire.option_name(event.option), flags=int(event.flags),
                           structured_replies=event.structured_replies)
        elif isinstance(event, Aborted | Disconnect):
            self._send(self._protocol.data_to_send())  # the ACK to ABORT, if any
            self._ending = True
            if not self._tasks:
                self._end()

    def _protocol_error(self, error: NbdProtocolError) -> None:
        self._log.warning("nbd_protocol_error", reason=error.reason, detail=error.message)
        self._ending = True
        if self._transport is not None:
            self._transport.abort()

    def _start(self, command: Command) -> None:
        self.requests += 1
        if command.kind is not CommandKind.FLUSH:
            self._in_flight_bytes += command.length
        started = self._clock()
        if command.kind is CommandKind.READ and self._read_now is not None:
            fast = _FastRead(self, command, started)
            if self._read_now(command.offset, command.length, fast):
                self._tasks.add(fast)
                return
        self._start_task(command, started)

    def _start_task(self, command: Command, started: float) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(command, started))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._request_done(done, command))

    def _read_now_done(self, fast: _FastRead, result: object) -> None:
        """A READ of the fast path ended: answer it, or on any failure hand it to the
        careful path (``backend.read``), which retries, fails over and reports errors."""
        command = fast.command
        if fast.cancelled:
            return  # accounted for when it was cancelled
        if not self._lost:
            if not isinstance(result, Data) or len(result) != command.length:
                self._tasks.discard(fast)
                self._start_task(command, fast.started)
                return
            self._send(self._protocol.reply_read(command.handle, command.offset, result))
            if self._waited is not None:
                self._waited(fast.started, self._clock())
        self._request_done(fast, command)

    def _request_done(self, task: asyncio.Task[None] | _FastRead, command: Command) -> None:
        self._tasks.discard(task)
        if command.kind is not CommandKind.FLUSH:
            self._in_flight_bytes -= command.length
        if self._ending or self._draining:
            if not self._tasks:
                self._end()
        elif self._reading_paused:
            self._pump()

    async def _serve(self, command: Command, started: float) -> None:
        protocol = self._protocol
        handle = command.handle
        reply: list[Data] | Data
        try:
            reply = await self._call(command)
        except OSError as error:
            code = wire.error_from_errno(error.errno or errno.EIO)
            message = getattr(error, "message", None) or error.strerror or str(error)
            if not getattr(error, "logged", False):
                self._log.warning("nbd_backend_error", command=command.kind.name,
                                  offset=command.offset, length=command.length,
                                  error=code.name, detail=message)
            reply = protocol.reply_error(handle, command.kind, code, message,
                                         getattr(error, "offset", None))
        except Exception:
            self._log.exception("nbd_request_failed", command=command.kind.name,
                                offset=command.offset, length=command.length)
            reply = protocol.reply_error(handle, command.kind, wire.NbdError.EIO,
                                         "internal error in the export (see its log)")
        self._send(reply)
        if self._waited is not None:
            self._waited(started, self._clock())

    async def _call(self, command: Command) -> list[Data] | bytes:
        backend = self._backend
        kind = command.kind
        protocol = self._protocol
        if kind is CommandKind.READ:
            data = await backend.read(command.offset, command.length)
            if len(data) != command.length:
                raise BackendError(errno.EIO, f"backend returned {len(data)} bytes of "
                                   f"{command.length}", offset=command.offset)
            return protocol.reply_read(command.handle, command.offset, data)
        fua = bool(command.flags & CommandFlag.FUA)
        if kind is CommandKind.WRITE:
            assert command.data is not None
            await backend.write(command.offset, command.data, fua)
        elif kind is CommandKind.FLUSH:
            await backend.flush()
        elif kind is CommandKind.TRIM:
            await _then_flush(backend, backend.trim(command.offset, command.length), fua)
        elif kind is CommandKind.WRITE_ZEROES:
            may_trim = not command.flags & CommandFlag.NO_HOLE
            zeroing = backend.write_zeroes(command.offset, command.length, may_trim)
            await _then_flush(backend, zeroing, fua)
        elif kind is CommandKind.CACHE:
            cache: Callable[[int, int], Awaitable[Any]] | None = getattr(backend, "cache", None)
            if cache is not None:
                await cache(command.offset, command.length)
        return protocol.reply_ok(command.handle)

    # -- sending ----------------------------------------------------------------------------

    def _send(self, data: list[Data] | Data) -> None:
        """Queue a reply; the queue goes out in one ``writelines`` once the event loop has
        run what is ready. At depth, a burst of reads finishes in one iteration, and one
        system call for all their replies costs less than one each."""
        transport = self._transport
        if transport is None or transport.is_closing() or not data:
            return
        if isinstance(data, list):
            self._out.extend(data)
        else:
            self._out.append(data)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        out, self._out = self._out, []
        transport = self._transport
        if not out or transport is None or transport.is_closing():
            return
        transport.writelines(out)
        if self._lent is not None:
            self._lent.wrote(out)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()


class _FastRead:
    """A READ served by the backend's ``read_now``: the callback it answers, and what the
    connection needs to track it like a task (cancel, count)."""

    __slots__ = ("cancelled", "command", "connection", "started")

    def __init__(self, connection: _ExportConnection, command: Command, started: float) -> None:
        self.connection = connection
        self.command = command
        self.started = started
        """When the command arrived: a failed fast read done again keeps its wait."""
        self.cancelled = False

    def __call__(self, result: object) -> None:
        self.connection._read_now_done(self, result)

    def cancel(self) -> bool:
        """Stop waiting: the request counts as done now; its answer, if any, is dropped."""
        if not self.cancelled:
            self.cancelled = True
            self.connection._request_done(self, self.command)
        return True


async def _then_flush(backend: Backend, operation: Awaitable[None], fua: bool) -> None:
    await operation
    if fua:  # trim and write_zeroes take no FUA of their own
        await backend.flush()


def _parse_listen_address(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if port == "0":  # any free port: parse_address wants a real one
        return parse_address(f"{host}:1").host, 0
    address = parse_address(text)
    return address.host, address.port


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed run would make bind fail; anything else is kept."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket", path)
    os.unlink(path)


__all__ = ["Backend", "BackendError", "NbdServer", "export_info", "serve_nbd"]
