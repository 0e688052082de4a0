"""Logging in: try the bootstrap servers in order and follow at most one redirect.

A login server may answer LOGIN with REDIRECT to the server that should stream; the target then
logs in there with ``redirected=True``, which that server must serve or refuse. A second
redirect would mean the servers disagree about who serves the vDisk, so it counts as that
server failing. Unreachable servers and retryable refusals move on to the next bootstrap
server; a refusal no other server would answer differently (an unknown vDisk, a bad name) ends
the login at once, so that a typo is reported immediately rather than after every timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol import events as ev
from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity
from pvs_target.address import parse_address
from pvs_target.connection import (
    ClientError,
    ConnectFailed,
    ConnectionLost,
    StreamConnection,
    open_connection,
)


class LoginError(ClientError):
    """No server would stream the vDisk. ``code`` is the deciding refusal, if there was one."""

    def __init__(self, code: ErrorCode | None, message: str, server: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.server = server

    @property
    def retryable(self) -> bool:
        return self.code is None or self.code.retryable


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """A logged-in connection and what LOGIN_OK said about the stream."""

    connection: StreamConnection
    identity: ReplicaIdentity
    block_size: int
    mode: int
    flags: ev.LoginFlag
    session_id: int
    server_name: str
    server_address: str
    """Where the server says it streams (as LOGIN_OK states it)."""
    connected_to: str
    """The address this connection was made to."""
    login_server: str
    """The bootstrap server the login started at."""
    redirected: bool
    site: tuple[str, ...] = ()
    """Other servers of the site, as the streaming server named them at login."""

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def max_request(self) -> int:
        return self.connection.max_request

    @property
    def read_only(self) -> bool:
        return ev.LoginFlag.READ_ONLY in self.flags

    async def close(self) -> None:
        await self.connection.close()


class _Refused(Exception):
    """A server answered LOGIN with ERROR."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def login(
    servers: Sequence[str],
    vdisk: str,
    device_id: str,
    *,
    pinned: ReplicaIdentity | None = None,
    max_request: int = 1 << 20,
    checksum: bool = True,
    connect_timeout: float = 5.0,
    log: FilteringBoundLogger | None = None,
    avoid: str = "",
    direct: bool = False,
) -> Session:
    """Log in to the first server in ``servers`` that will stream ``vdisk``; raise LoginError.

    ``avoid`` names a server the target just lost, so that no login server sends it back
    there; ``direct`` asks each server to serve the target itself (never redirect), for
    vDisks that one fixed server provides.
    """
    log = (log or structlog.get_logger()).bind(vdisk=vdisk, device_id=device_id)
    if not servers:
        raise LoginError(None, "no server given: name at least one with --server HOST:PORT", "")
    failures: list[str] = []
    last_code: ErrorCode | None = None
    for server in servers:
        parse_address(server)  # a malformed address is the user's error: report it as such
        attempt = _Attempt(
            vdisk, device_id, pinned, max_request, checksum, connect_timeout, log, avoid, direct
        )
        try:
            return await attempt.run(server)
        except _Refused as refusal:
            last_code = refusal.code
            if not refusal.code.retryable:
                raise LoginError(refusal.code, _advice(refusal, vdisk, server), server) from None
            failures.append(f"{server}: {refusal.code.name}: {refusal.message}")
        except ClientError as error:
            if isinstance(error, ConnectionLost) and error.code is not None:
                last_code = error.code
            failures.append(str(error))
    raise LoginError(
        last_code,
        f"no server would stream vDisk {vdisk!r} ({'; '.join(failures)}): "
        "check that pvsd runs at the --server addresses and serves this vDisk, then retry",
        servers[-1],
    )


def _advice(refusal: _Refused, vdisk: str, server: str) -> str:
    what = f"{server} refused vDisk {vdisk!r}: {refusal.code.name}: {refusal.message}"
    match refusal.code:
        case ErrorCode.UNKNOWN_VDISK:
            return f"{what}: check the vDisk name against the server's vDisk store"
        case ErrorCode.BAD_NAME:
            return f"{what}: vDisk and device names are letters, digits, '.', '_' and '-'"
        case ErrorCode.UNSUPPORTED_VERSION:
            return f"{what}: upgrade pvs-target or pvsd so that both speak the same version"
        case _:
            return what


@dataclasses.dataclass
class _Attempt:
    vdisk: str
    device_id: str
    pinned: ReplicaIdentity | None
    max_request: int
    checksum: bool
    timeout: float
    log: FilteringBoundLogger
    avoid: str = ""
    direct: bool = False

    async def run(self, server: str) -> Session:
        reply = await self._login_at(server, redirected=self.direct)
        if not isinstance(reply, ev.Redirect):
            return await self._session(*reply, server, redirected=False)
        target = reply.address
        self.log.info(
            "login_redirected", login_server=server, to=target, to_name=reply.server_name,
            reason=reply.reason,
        )
        try:
            parse_address(target)
        except ValueError as error:
            raise ConnectionLost(f"{server} redirected to a bad address: {error}") from None
        again = await self._login_at(target, redirected=True)
        assert not isinstance(again, ev.Redirect), "Connection refuses a redirect loop"
        return await self._session(*again, server, redirected=True)

    async def _login_at(
        self, address: str, *, redirected: bool
    ) -> tuple[StreamConnection, ev.LoginOk] | ev.Redirect:
        """One connection, one LOGIN; the connection stays open only after LOGIN_OK."""
        try:
            connection = await open_connection(address, timeout=self.timeout, log=self.log)
        except ConnectFailed as error:
            self.log.warning("login_connect_failed", server=address, reason=error.reason)
            raise
        try:
            async with asyncio.timeout(self.timeout):
                await connection.hello(max_request=self.max_request, checksum=self.checksum)
                login = ev.Login(
                    self.device_id, self.vdisk, self.pinned, redirected, self.avoid
                )
                reply = await connection.login(login)
        except TimeoutError:
            await connection.close(ErrorCode.TIMEOUT, "no answer to login")
            self.log.warning("login_timeout", server=address, seconds=self.timeout)
            raise ConnectionLost(f"{address} did not answer within {self.timeout:g} s") from None
        except BaseException:
            connection.abort()
            raise
        if isinstance(reply, ev.LoginOk):
            return connection, reply
        await connection.close()  # after REDIRECT the connection has ended: no GOODBYE
        if isinstance(reply, ev.Error):
            self.log.warning(
                "login_refused", server=address, code=reply.code.name, detail=reply.message
            )
            raise _Refused(reply.code, reply.message)
        return reply

    async def _session(
        self, connection: StreamConnection, ok: ev.LoginOk, login_server: str, *, redirected: bool
    ) -> Session:
        if self.pinned is not None and ok.identity != self.pinned:
            differences = ", ".join(self.pinned.differences(ok.identity))
            await connection.close(ErrorCode.NO_IDENTICAL_REPLICA, "not the pinned replica")
            raise ConnectionLost(
                f"{connection.server} offered a replica differing in {differences} "
                "from the pinned one",
                code=ErrorCode.NO_IDENTICAL_REPLICA,
            )
        self.log.info(
            "login_ok", server=connection.server, server_name=ok.server_name,
            identity=ok.identity.short, session_id=ok.session_id, redirected=redirected,
        )
        return Session(
            connection=connection,
            identity=ok.identity,
            block_size=ok.block_size,
            mode=ok.mode,
            flags=ok.flags,
            session_id=ok.session_id,
            server_name=ok.server_name,
            server_address=ok.server_address,
            connected_to=connection.server,
            login_server=login_server,
            redirected=redirected,
            site=ok.site,
        )


__all__ = ["LoginError", "Session", "login"]
