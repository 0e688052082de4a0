"""The network boot listener's connections, bounded: the asyncio side of `pvsd.boot_limits`.

aiohttp bounds what one request may hold (`REQUEST_LIMITS`), but not how many connections a
listener keeps, from one address or in all; and its keep-alive timer closes a connection that
waits for a request without a word (one that never sent a request, only in recent versions:
aio-libs/aiohttp#13681). So the listening socket is ours (`GuardedSite`, an aiohttp site):
every accepted connection gets a `_Guarded` protocol in front of aiohttp's, which admits it
or not, notes the bytes that arrive, and closes it at its deadline. aiohttp tells the guard
when a request is whole (the listener's middleware) and when its answer is sent (its access
log). Its own keep-alive timer stays, set later than the deadline (`keepalive_timeout`): a
backstop for a connection whose answer the guard did not hear of.

A refused connection is answered one line (503) and closed; a replaced one, which may be
parsing a request, is closed without a word; one whose deadline passed without a whole
request is answered 408 and closed; an idle keep-alive connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import structlog
from aiohttp import web

from pvsd.boot_limits import Admission, BootConnections, EpisodeEnd, Expiry, Scope

log = structlog.get_logger("pvsd.boot")

REQUEST_LIMITS: dict[str, int] = {
    "max_line_size": 4096, "max_field_size": 4096, "max_headers": 32,
}
"""aiohttp's request parser, for each connection: a request line and a header of at most 4 KiB
and 32 headers (its defaults: 8 KiB and 128, up to 1 MiB of headers held per connection).
iPXE's requests are a short path and a few headers."""
BACKSTOP = 2.0
"""aiohttp's keep-alive timer is this many times the request deadline."""


def keepalive_timeout(request_timeout: float) -> float:
    """aiohttp's ``keepalive_timeout``: later than the guard's deadline, which must close
    first to say why (aiohttp says nothing)."""
    return request_timeout * BACKSTOP


class ConnectionGuard:
    """Admits, watches and closes the listener's connections (`BootConnections` decides)."""

    def __init__(self, cap: int, per_source: int, request_timeout: float) -> None:
        self.book: BootConnections[_Guarded] = BootConnections(cap, per_source, request_timeout)
        self._by_transport: dict[asyncio.BaseTransport, _Guarded] = {}
        self._closing = False

    def protocol(self, inner: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """The protocol of a new connection: ours, in front of ``inner()`` (aiohttp's)."""
        return _Guarded(self, inner)

    def close(self) -> None:
        """The listener stops: no more deadlines (aiohttp closes the connections)."""
        self._closing = True
        for connection in list(self._by_transport.values()):
            connection.cancel_timer()

    # -- from aiohttp -----------------------------------------------------------------------

    def request(self, transport: asyncio.BaseTransport | None) -> None:
        """A request is whole (the middleware runs): no deadline while it is answered."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None:
            connection.cancel_timer()
            self._ended(self.book.request(connection))

    def answered(self, transport: asyncio.BaseTransport | None) -> None:
        """Its answer is sent (the access log): the next request has a deadline."""
        connection = self._by_transport.get(transport) if transport is not None else None
        if connection is not None and connection in self.book:
            self.book.answered(connection, _now())
            self._arm(connection)

    # -- from the connections ---------------------------------------------------------------

    def _opened(self, connection: _Guarded) -> bool:
        book = self.book
        admission = book.open(connection, connection.source, _now())
        if admission.first:
            self._over_cap(connection.source, admission)
        if not admission.admitted:
            connection.refuse(
                503, f"too many connections from {connection.source} to this boot listener: "
                "try again in a moment" if admission.scope is Scope.source else
                "this boot listener has as many connections as it keeps: try again in a moment"
            )
            return False
        if admission.replaces is not None:
            admission.replaces.cancel_timer()
            admission.replaces.drop()
        assert connection.transport is not None
        self._by_transport[connection.transport] = connection
        self._arm(connection)
        return True

    def _received(self, connection: _Guarded) -> None:
        self.book.received(connection)

    def _closed(self, connection: _Guarded) -> None:
        connection.cancel_timer()
        if connection.transport is not None:
            self._by_transport.pop(connection.transport, None)
        for end in self.book.close(connection):
            self._ended(end)

    # -- deadlines --------------------------------------------------------------------------

    def _arm(self, connection: _Guarded) -> None:
        connection.cancel_timer()
        deadline = self.book.deadline(connection)
        if deadline is not None and not self._closing:
            connection.timer = asyncio.get_running_loop().call_at(
                deadline, self._expire, connection
            )

    def _expire(self, connection: _Guarded) -> None:
        connection.timer = None
        expiry = self.book.expire(connection, _now())
        if expiry is None:
            self._arm(connection)  # answered meanwhile, or fired a little early
            return
        if expiry.timed_out:
            if expiry.first:
                self._timed_out(connection, expiry)
            connection.refuse(408, "no whole request in "
                              f"{self.book.request_timeout:g} s: closed")
        else:
            log.debug("boot_keepalive_closed", client=connection.source)
            connection.drop()

    # -- what is logged ---------------------------------------------------------------------

    def _over_cap(self, source: str, admission: Admission[_Guarded]) -> None:
        book = self.book
        if admission.scope is Scope.source:
            action = (
                f"{source} holds {admission.cap} connections to the boot listener (max_"
                "connections_per_source): new ones replace its oldest that wait for a request, "
                "or are refused while all are being answered. Machines behind one NAT address "
                "need a larger max_connections_per_source; otherwise that host opens "
                "connections it does not use"
            )
        else:
            action = (
                f"the boot listener holds {admission.cap} connections (boot_max_connections): "
                "new ones replace the oldest that wait for a request, or are refused while all "
                "are being answered. A boot storm larger than that needs a larger boot_max_"
                "connections; otherwise look for hosts that open connections they do not use "
                "(ss -tn state established sport = :PORT)"
            )
        log.warning(
            "boot_connections_over_cap", scope=str(admission.scope), cap=admission.cap,
            client=source, refused=not admission.admitted, connections=len(book),
            action=action,
        )

    def _timed_out(self, connection: _Guarded, expiry: Expiry) -> None:
        log.warning(
            "boot_request_timeout", client=connection.source,
            seconds=self.book.request_timeout, partial=expiry.partial,
            waiting=self.book.pending,
            action="a connection to the boot listener sent "
            + ("part of a request" if expiry.partial else "nothing")
            + f" in {self.book.request_timeout:g} s (boot_request_timeout) and was closed; "
            "others closed so until none is left waiting are counted, not logged each. If it "
            "is a machine on a very slow link, raise boot_request_timeout; otherwise look at "
            "what that host opens connections for",
        )

    def _ended(self, end: EpisodeEnd | None) -> None:
        if end is None:
            return
        seconds = round(_now() - end.since, 1)
        if end.scope is Scope.deadline:
            log.info("boot_request_timeouts_ended", timed_out=end.count, seconds=seconds)
        else:
            log.info("boot_connections_under_cap", scope=str(end.scope), client=end.source,
                     refused_or_replaced=end.count, seconds=seconds)


class _Guarded(asyncio.Protocol):
    """One connection: ours until admitted, then passed through to aiohttp's protocol."""

    def __init__(self, guard: ConnectionGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self.guard = guard
        self._make_inner: Callable[[], asyncio.Protocol] | None = inner
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.source = _source(transport.get_extra_info("peername"))
        make, self._make_inner = self._make_inner, None
        if make is not None and self.guard._opened(self):
            self.inner = make()
            self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.guard._received(self)
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard._closed(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def refuse(self, status: int, message: str) -> None:
        """Answer one line and close (no request of it is being answered)."""
        if self.transport is None or self.transport.is_closing():
            return
        body = (message + "\n").encode()
        reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        self.transport.close()

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class GuardedSite(web.BaseSite):
    """An aiohttp site on a TCP socket of ours, every connection through ``guard``."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, guard: ConnectionGuard, host: str,
                 port: int) -> None:
        super().__init__(runner)
        self._guard = guard
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: guard.protocol(server), self._host or None, self._port,
            reuse_address=True, backlog=self._backlog,
        )

    async def stop(self) -> None:
        self._guard.close()
        await super().stop()


def _source(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unix"


def _now() -> float:
    return asyncio.get_running_loop().time()

