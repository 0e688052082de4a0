"""One target-to-server connection: the asyncio adapter around the sans-IO ``Connection``.

``StreamConnection`` owns the transport. Bytes arrive through ``BufferedProtocol``
(``StreamReader.readexactly`` of 1 MiB is ~5x slower, ANCHORS.md): headers and small frames
into one reusable chunk, the data of a large READ_DATA straight into a pooled buffer that
becomes the reply (``Connection.receive_buffer``), so block data is never copied in user
space. Each frame leaves in one ``write`` so a header never waits for its payload behind
Nagle. Any number of callers may ``read`` at once: requests are pipelined up to the server's
``max_in_flight`` and each reply lands on its own future, whatever order the server answers
in. ``read_now`` is the same without a coroutine, for the NBD export's hot path.

When the connection ends for any reason (the server's GOODBYE, a reset, a protocol breach, our
own ``close``) every waiter fails with one typed ``ClientError``; nothing is left hanging.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.buffers import BufferPool
from pvs_protocol.connection import Connection, Phase, Role
from pvs_protocol.errors import ErrorCode, ProtocolError
from pvs_target.address import Address, parse_address

SOFTWARE = "pvs-target/0.1"
RECEIVE_CHUNK = 256 * 1024
"""Size of the reusable receive buffer: one ``recv_into`` at most."""
LINGER = 5.0
"""Longest a connection we ended waits for the server to close it (see ``end``)."""
SOCKET_RECEIVE_BUFFER = 4 * 1024 * 1024
"""SO_RCVBUF, set before connecting so the window scale fits; enough for 32 x 128 KiB."""
_MAX_REQUEST_ID = (1 << 64) - 1
BUFFERS = BufferPool()
"""The block buffers of this process's connections: a reply's data is received into one,
and whoever is done with it (the NBD export, once the reply is written) gives it back."""
_PEEK = wire.HEADER_SIZE + max(wire.BLOCK_PREFIX.values())

Reply = bytes | bytearray | memoryview | None
_Request = ev.Read | ev.Write | ev.Flush | ev.Digests
Done = Callable[["Reply | ClientError"], None]
"""Called with a request's answer, or with the error that ended it (see ``read_now``)."""


class ClientError(Exception):
    """Base of every failure the target client reports; ``str()`` is a sentence for users."""


class ConnectFailed(ClientError):
    """No TCP connection could be made (refused, unreachable, no answer in time)."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(f"cannot connect to {server}: {reason}")
        self.server = server
        self.reason = reason


class ConnectionLost(ClientError):
    """The connection ended before the reply came; the request may be retried elsewhere.

    ``code`` is the error code of the GOODBYE or protocol breach that ended it, if any.
    """

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ServerError(ClientError):
    """The server answered a request with ERROR."""

    def __init__(self, code: ErrorCode, message: str, *, request_id: int = 0) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def retryable(self) -> bool:
        return self.code.retryable


async def open_connection(
    address: str | Address,
    *,
    timeout: float = 5.0,
    receive_buffer: int | None = SOCKET_RECEIVE_BUFFER,
    log: FilteringBoundLogger | None = None,
) -> StreamConnection:
    """Connect to ``address`` (``HOST:PORT``); raise ConnectFailed on any failure.

    The socket is made here rather than by ``create_connection`` so that its options are set
    before the SYN (a receive buffer set later cannot raise the negotiated window scale).
    """
    target = parse_address(address) if isinstance(address, str) else address
    name = str(target)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect_socket(loop, target, receive_buffer)
            try:
                transport, protocol = await loop.create_connection(
                    lambda: StreamConnection(name, log=log), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            try:
                # uvloop returns before connection_made has run (asyncio after): wait for it.
                await protocol._made.wait()
            except BaseException:
                transport.abort()
                raise
    except TimeoutError:
        raise ConnectFailed(name, f"no answer within {timeout:g} s") from None
    except socket.gaierror as error:  # its errno is not an OS error number
        raise ConnectFailed(
            name, f"cannot resolve host name {target.host!r}: {str(error.strerror).lower()}"
        ) from None
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ConnectFailed(name, reason.lower()) from None
    return protocol


async def _connect_socket(
    loop: asyncio.AbstractEventLoop, target: Address, receive_buffer: int | None
) -> socket.socket:
    infos = await loop.getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    last_error: OSError = OSError(f"{target.host} has no address")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            await loop.sock_connect(sock, sockaddr)
        except OSError as error:
            sock.close()
            last_error = error
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last_error


def _reading(offset: int, length: int) -> Callable[[int], ev.Read]:
    return lambda request_id: ev.Read(request_id, offset, length)


class _Slots:
    """The requests the server lets us have in flight: a semaphore that can also be taken
    without awaiting (``try_take``), for ``read_now``."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as we were cancelled: pass it on
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the first waiter
                return
        self.free += 1


class StreamConnection(asyncio.BufferedProtocol):
    """The target's side of one connection: handshake, pipelined requests, keepalive."""

    def __init__(
        self,
        server: str,
        *,
        log: FilteringBoundLogger | None = None,
        receive_chunk: int = RECEIVE_CHUNK,
    ) -> None:
        self.server = server
        """The address we connected to, ``HOST:PORT``."""
        self._log: FilteringBoundLogger = (log or structlog.get_logger()).bind(server=server)
        self._loop = asyncio.get_running_loop()
        self._protocol = Connection(Role.CLIENT, allocate=BUFFERS.take)
        self._chunk = memoryview(bytearray(receive_chunk))
        self._direct = False
        self._peek = False
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[ev.Event] | None = None
        self._pending: dict[int, asyncio.Future[Reply] | Done] = {}
        self._sent_at: dict[int, float] = {}
        """When each outstanding request went out, oldest first (dicts keep insertion order):
        the failover layer gives up on a server that leaves one unanswered too long."""
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._slots: _Slots | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._made = asyncio.Event()
        self._closed = asyncio.Event()
        self._failure: ClientError | None = None
        self._last_id = 0
        self._tokens = itertools.count(1)
        self.hello_reply: ev.HelloReply | None = None
        self.login_ok: ev.LoginOk | None = None
        self.goodbye: ev.Goodbye | None = None
        """The server's GOODBYE, if it sent one."""
        self.relogin = asyncio.Event()
        """Set when the server asks the target to log in elsewhere (see ``relogin_notice``)."""
        self.relogin_notice: ev.Relogin | None = None
        self.on_relogin: Callable[[ev.Relogin], None] | None = None
        self.on_closed: Callable[[ClientError], None] | None = None
        """Called once when the connection ends, so an idle owner learns of it at once."""
        self._outbox: list[bytes | bytearray | memoryview] = []
        self._waiting_reads: collections.deque[tuple[int, int, Done]] = collections.deque()
        """``read_now`` requests beyond ``max_in_flight``, sent as slots come back."""
        self.last_heard = self._loop.time()
        """When a whole frame last arrived: the failover layer declares a silent server gone.
        Bytes of a frame not yet whole do not count: a server that drips a reply byte by byte
        is not serving."""
        self.in_flight_at_failure = 0
        """Requests that were outstanding when the connection ended (for status and logs)."""
        self.on_site: Callable[[ev.SiteUpdate], None] | None = None
        """Called with each SITE the server sends: servers of the site serving now."""
        self._linger: asyncio.TimerHandle | None = None

    # -- state ------------------------------------------------------------------------------

    @property
    def max_request(self) -> int:
        return self._protocol.max_request

    @property
    def max_in_flight(self) -> int:
        return self._protocol.max_in_flight

    @property
    def checksum(self) -> ev.Checksum:
        return self._protocol.checksum

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def oldest_sent(self) -> float | None:
        """When the oldest request still unanswered went out (loop time), or None."""
        return next(iter(self._sent_at.values()), None)

    @property
    def failure(self) -> ClientError | None:
        """Why the connection ended, once it has."""
        return self._failure

    @property
    def is_open(self) -> bool:
        return self._failure is None and self._transport is not None

    @property
    def is_closing(self) -> bool:
        """Its transport is not closed yet (an ended connection may still be sending the last
        frames it was given)."""
        return self._transport is not None and not self._closed.is_set()

    # -- handshake --------------------------------------------------------------------------

    async def hello(self, *, max_request: int = 1 << 20, checksum: bool = True) -> ev.HelloReply:
        offered = frozenset({ev.Checksum.CRC32}) if checksum else frozenset()
        hello = ev.Hello(wire.VERSION, wire.VERSION, max_request, offered, SOFTWARE)
        reply = await self._exchange(hello)
        if not isinstance(reply, ev.HelloReply):  # the state machine allows nothing else
            raise ConnectionLost(f"{self.server} answered HELLO with {type(reply).__name__}")
        self.hello_reply = reply
        self._slots = _Slots(reply.max_in_flight)
        self._log.debug(
            "hello_ok", server_name=reply.server_name, max_request=reply.max_request,
            max_in_flight=reply.max_in_flight, checksum=reply.checksum.name,
        )
        return reply

    async def login(self, login: ev.Login) -> ev.LoginOk | ev.Redirect | ev.Error:
        """Send one LOGIN and return the server's answer (ERROR leaves the connection open)."""
        reply = await self._exchange(login)
        if not isinstance(reply, ev.LoginOk | ev.Redirect | ev.Error):
            raise ConnectionLost(f"{self.server} answered LOGIN with {type(reply).__name__}")
        if isinstance(reply, ev.LoginOk):
            self.login_ok = reply
        return reply

    async def _exchange(self, event: ev.Event) -> ev.Event:
        self._raise_if_failed()
        if self._waiter is not None:
            raise RuntimeError("one handshake step at a time")
        waiter: asyncio.Future[ev.Event] = self._loop.create_future()
        self._waiter = waiter
        try:
            self._send(event)
            return await waiter
        finally:
            self._waiter = None

    # -- requests ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        """Read ``length`` bytes at ``offset``; ``length`` at most ``max_request``. The buffer
        is the caller's: nothing else holds it."""
        self._check_request(offset, length)
        data = await self._request(lambda request_id: ev.Read(request_id, offset, length))
        # The state machine checked it is READ_DATA of that length; the decoder made it.
        assert isinstance(data, bytes | bytearray)
        return data

    async def digests(self, level: int, page: int, length: int) -> bytes | bytearray:
        """Page ``page`` of ``level`` of the manifest tree of the replica logged in to
        (``length`` bytes, which the caller knows from the tree's shape). It shares the
        request slots with reads; what it returns is unproven until ``Verifier.add_page``."""
        self._raise_if_failed()
        if level < 0 or page < 0:
            raise ValueError(f"no page {page} of level {level}")
        if not 0 < length <= wire.MAX_DIGEST_PAGE:
            raise ValueError(f"digest page of {length} bytes outside 1..{wire.MAX_DIGEST_PAGE}")
        data = await self._request(lambda request_id: ev.Digests(request_id, level, page, length))
        assert isinstance(data, bytes | bytearray)  # READ_DATA of that length (state machine)
        return data

    def report_damaged(self, block: int, message: str) -> None:
        """Tell the server that its block ``block`` does not match the manifest (DAMAGED: no
        answer). Sent at once, so that a GOODBYE that follows cannot overtake it; a no-op
        on a connection that has ended, which has nobody left to tell."""
        if self._failure is not None or self._protocol.phase is not Phase.STREAMING:
            return
        try:
            self._send(ev.Damaged(block, message))
        except ProtocolError as error:  # a message too long for the frame: say less
            self._log.warning("damaged_not_sent", block=block, detail=str(error))

    def end(self, code: ErrorCode, message: str) -> None:
        """Say GOODBYE with ``code`` and close without waiting: what was sent before (a
        DAMAGED report) still leaves, unlike with ``abort``. Every waiter fails now.

        Only our sending side is shut (FIN after GOODBYE), and what the server still sends is
        read and dropped until it closes, for at most ``LINGER`` seconds: closing a socket
        with unread data makes the kernel reset the connection, and a server that had stopped
        reading (its replies to us were backed up) would lose the report with it."""
        self._fail(
            ConnectionLost(f"connection to {self.server} was closed by the target: {message}",
                           code=code),
            goodbye=ev.Goodbye(code, message),
            linger=True,
        )

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (a Standard Image server refuses with READ_ONLY)."""
        self._check_request(offset, len(data))
        await self._request(lambda request_id: ev.Write(request_id, offset, data))

    async def flush(self) -> None:
        await self._request(ev.Flush)

    async def ping(self) -> float:
        """Seconds for one KEEPALIVE round trip."""
        self._raise_if_failed()
        if self._protocol.phase is Phase.HELLO:
            raise RuntimeError("ping before the HELLO exchange")
        token = next(self._tokens)
        future: asyncio.Future[None] = self._loop.create_future()
        self._pings[token] = future
        try:
            start = time.perf_counter()  # uvloop's loop.time() has millisecond resolution
            self._send(ev.Keepalive(token))
            await future
            return time.perf_counter() - start
        finally:
            self._pings.pop(token, None)

    def nudge(self) -> None:
        """Send a KEEPALIVE without waiting: its answer (or silence) shows in ``last_heard``."""
        if self.is_open and self._protocol.phase is not Phase.HELLO:
            self._send(ev.Keepalive(next(self._tokens)))

    def _check_request(self, offset: int, length: int) -> None:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if self.max_request and not 0 < length <= self.max_request:
            raise ValueError(f"request of {length} bytes outside 1..{self.max_request}")

    def read_now(self, offset: int, length: int, done: Done) -> bool:
        """Send a READ and call ``done`` with its data (a buffer the caller owns) or the
        ``ClientError`` that ended it, as soon as either arrives; False if it cannot be taken
        (writing paused, not streaming): then ``read`` is the way. Beyond the server's
        ``max_in_flight`` it waits in a queue of its own, sent as answers free slots.

        The hot path of the NBD export: no coroutine, no future, and the answer is handled
        in the same loop turn it arrives in (a future's callbacks run one turn later).
        The request leaves with the next ``send_queued`` or at the end of this turn."""
        slots = self._slots
        if (
            slots is None
            or self._failure is not None
            or self._protocol.phase is not Phase.STREAMING
            or not self._writable.is_set()
        ):
            return False
        self._check_request(offset, length)
        if slots.try_take():
            self._send_request(_reading(offset, length), done)
        else:
            self._waiting_reads.append((offset, length, done))
        return True

    def _send_waiting_reads(self) -> None:
        slots = self._slots
        waiting = self._waiting_reads
        while waiting and slots is not None and slots.try_take():
            offset, length, done = waiting.popleft()
            self._send_request(_reading(offset, length), done)

    async def _request(self, build: Callable[[int], _Request]) -> Reply:
        self._check_streaming()
        slots = self._slots
        assert slots is not None  # set by hello(), which streaming requires
        await slots.take()
        # The slot is given back when the reply arrives (in _complete), not when this caller
        # returns: a cancelled caller's request is still in flight at the server.
        try:
            while not self._writable.is_set():
                await self._writable.wait()
            self._check_streaming()
        except BaseException:
            slots.give()
            raise
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._send_request(build, future)
        return await future

    def _send_request(
        self, build: Callable[[int], _Request],
        waiter: asyncio.Future[Reply] | Done,
    ) -> None:
        """Send a request for which a slot is taken (and given back on any failure here); its
        answer goes to ``waiter``."""
        try:
            request_id = self._next_request_id()
            buffers = self._protocol.send_buffers(build(request_id))
        except BaseException:
            assert self._slots is not None
            self._slots.give()
            raise
        self._pending[request_id] = waiter
        self._sent_at[request_id] = self._loop.time()
        self._queue(buffers)

    def send_queued(self) -> None:
        """Write the requests queued so far now rather than at the end of this loop turn:
        for a caller that knows its burst of requests is over (the NBD export, after all the
        commands one receive brought), this saves a loop turn of latency per request."""
        if self._outbox:
            self._write_outbox()

    def _queue(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        """Gather the requests made in one turn of the event loop into one write: at a deep
        queue of small reads, a system call per request is most of the cost."""
        if not self._outbox:
            self._loop.call_soon(self._write_outbox)
        self._outbox += buffers

    def _write_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        transport = self._transport
        if outbox and transport is not None and not transport.is_closing():
            transport.writelines(outbox)

    def _next_request_id(self) -> int:
        while True:
            self._last_id = self._last_id % _MAX_REQUEST_ID + 1
            if self._last_id not in self._pending:
                return self._last_id

    def _check_streaming(self) -> None:
        self._raise_if_failed()
        if self._protocol.phase is not Phase.STREAMING:
            raise RuntimeError("requests need a successful login first")

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._transport is None:
            raise RuntimeError("not connected")

    # -- closing ----------------------------------------------------------------------------

    async def close(self, code: int = 0, message: str = "") -> None:
        """Say GOODBYE (if the connection is still up), close, and wait until it is closed."""
        self._fail(
            ConnectionLost(f"connection to {self.server} was closed by the target"),
            goodbye=ev.Goodbye(code, message),
        )
        await self.wait_closed()

    def abort(self, *, force: bool = False) -> None:
        """Drop the connection at once, without GOODBYE. On a connection already ended
        (``end``, a protocol breach) it leaves the closing transport alone, so that the
        GOODBYE or DAMAGED report it still holds is sent, unless ``force`` (its owner is
        shutting down and has waited long enough)."""
        if self._failure is None:
            self._fail(ConnectionLost(f"connection to {self.server} was aborted by the target"))
        elif not force:
            return
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        if self._transport is not None:
            await self._closed.wait()

    async def __aenter__(self) -> StreamConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _fail(
        self, failure: ClientError, *, goodbye: ev.Goodbye | None = None, linger: bool = False
    ) -> None:
        """End the connection: tell the server why if we can, then fail every waiter."""
        if self._failure is not None:
            return
        self._failure = failure
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if goodbye is not None and self._protocol.phase is not Phase.CLOSED:
                with contextlib.suppress(ProtocolError, ValueError):  # then just close
                    self._write(self._protocol.send_buffers(goodbye))
            if linger and transport.can_write_eof():
                transport.write_eof()  # after what is buffered, GOODBYE included
                self._linger = self._loop.call_later(LINGER, transport.abort)
            else:
                transport.close()  # still sends what is buffered, GOODBYE included
        pending = list(self._pending.values())
        self.in_flight_at_failure = len(pending)
        self._pending.clear()
        self._sent_at.clear()
        if self._slots is not None:
            for _ in pending:
                self._slots.give()  # wakes callers queued for a slot; they see the failure
        waiting = [done for _, _, done in self._waiting_reads]
        self._waiting_reads.clear()
        for waiter in [*pending, *waiting]:
            if not isinstance(waiter, asyncio.Future):
                self._call(waiter, failure)
        waiters: list[asyncio.Future[Any]] = [
            *(w for w in pending if isinstance(w, asyncio.Future)), *self._pings.values(),
        ]
        if self._waiter is not None:
            waiters.append(self._waiter)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(failure)
        self._writable.set()
        if self.on_closed is not None:
            self.on_closed(failure)

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio only does this for sockets made with proto=IPPROTO_TCP (ANCHORS.md).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._made.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        direct = self._protocol.receive_buffer()
        self._direct = direct is not None
        if direct is not None:  # block data: straight into the buffer the reply will carry
            return direct
        if self._peek:
            # After a large reply, another one most likely follows: take only its header and
            # prefix here, so its data is received in place rather than through this chunk.
            return self._chunk[:_PEEK]
        return self._chunk

    def buffer_updated(self, nbytes: int) -> None:
        # (uvloop may ask for a buffer, find nothing to read and ask again: only what was
        # actually received moves the peeking on)
        self._peek = self._direct
        if self._direct:
            self._protocol.received(nbytes)
        else:
            self._protocol.receive_data(self._chunk[:nbytes])
        try:
            while self._failure is None:
                event = self._protocol.next_event()
                if isinstance(event, ev.NeedData):
                    self.send_queued()  # the requests answers made room for, in one write
                    return
                self.last_heard = self._loop.time()
                self._handle(event)
        except ProtocolError as error:
            self._log.warning("protocol_error", code=error.code.name, detail=error.message)
            what = (
                "does not speak the pvs protocol (is this pvsd's stream port?)"
                if self._protocol.phase is Phase.HELLO
                else "broke the protocol"
            )
            self._fail(
                ConnectionLost(f"{self.server} {what}: {error}", code=error.code),
                goodbye=ev.Goodbye(error.code, error.message),
            )

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        reason = f"connection to {self.server} lost: {exc}" if exc else (
            f"{self.server} closed the connection"
        )
        self._fail(ConnectionLost(reason))
        self._closed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- events -----------------------------------------------------------------------------

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.ReadData(request_id, data):
                self._complete(request_id, data)
            case ev.Done(request_id):
                self._complete(request_id, None)
            case ev.Error(request_id, code, message) if request_id != 0:
                if self._protocol.phase is Phase.LOGIN:
                    self._deliver(event)  # a refused login, whatever id the server used
                else:
                    self._complete(request_id, ServerError(code, message, request_id=request_id))
            case ev.Error(_, code, message):
                if self._protocol.phase is Phase.LOGIN:
                    self._deliver(event)
                else:  # a connection-level report; the GOODBYE that follows ends it
                    self._log.warning("server_error", code=code.name, detail=message)
            case ev.Keepalive(token, reply):
                if reply:
                    future = self._pings.pop(token, None)
                    if future is not None and not future.done():
                        future.set_result(None)
                else:
                    self._send(ev.Keepalive(token, reply=True))
            case ev.Relogin():
                self._relogin(event)
            case ev.SiteUpdate():
                if self.on_site is not None:
                    try:
                        self.on_site(event)
                    except Exception:
                        self._log.exception("site_callback_failed")
            case ev.Goodbye(code, message):
                self._goodbye(event)
            case ev.HelloReply() | ev.LoginOk() | ev.Redirect():
                self._deliver(event)
            case _:  # the state machine lets no other frame reach a client
                raise AssertionError(f"unexpected {event!r}")

    def _complete(self, request_id: int, result: Reply | ServerError) -> None:
        future = self._pending.pop(request_id, None)
        if future is None:
            return
        del self._sent_at[request_id]
        assert self._slots is not None
        self._slots.give()
        if self._waiting_reads:
            self._send_waiting_reads()
        if not isinstance(future, asyncio.Future):
            self._call(future, result)
            return
        if future.done():  # its caller was cancelled
            return
        if isinstance(result, ServerError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _call(self, done: Done, result: Reply | ClientError) -> None:
        try:
            done(result)
        except Exception:  # the caller's bug must not break the connection for the others
            self._log.exception("request_callback_failed")

    def _deliver(self, event: ev.Event) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(event)
        else:
            self._log.debug("late_handshake_reply", frame=type(event).__name__)

    def _relogin(self, notice: ev.Relogin) -> None:
        self._log.warning("relogin_requested", deadline_ms=notice.deadline_ms, reason=notice.reason)
        self.relogin_notice = notice
        self.relogin.set()
        if self.on_relogin is not None:
            try:
                self.on_relogin(notice)
            except Exception:
                self._log.exception("relogin_callback_failed")

    def _goodbye(self, goodbye: ev.Goodbye) -> None:
        self.goodbye = goodbye
        try:
            code: ErrorCode | None = ErrorCode(goodbye.code) if goodbye.code else None
        except ValueError:
            code = ErrorCode.INTERNAL
        if code is None:
            self._log.info("server_goodbye", detail=goodbye.message)
            message = f"{self.server} closed the connection"
        else:
            self._log.warning("server_goodbye", code=code.name, detail=goodbye.message)
            message = f"{self.server} ended the connection: {code.name}"
        if goodbye.message:
            message += f": {goodbye.message}"
        self._fail(ConnectionLost(message, code=code))

    # -- sending ----------------------------------------------------------------------------

    def _send(self, event: ev.Event) -> None:
        self._write(self._protocol.send_buffers(event))

    def _write(self, buffers: list[bytes | bytearray | memoryview]) -> None:
        transport = self._transport
        assert transport is not None
        if self._outbox:  # requests queued earlier go first
            buffers = [*self._outbox, *buffers]
            self._outbox = []
        if len(buffers) == 1:
            transport.write(buffers[0])
        else:
            transport.writelines(buffers)


__all__ = [
    "ClientError",
    "ConnectFailed",
    "ConnectionLost",
    "ServerError",
    "StreamConnection",
    "open_connection",
]
