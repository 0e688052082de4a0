"""The stream service: listens for targets, owns their sessions, and shuts down in order."""

from __future__ import annotations

import asyncio
import enum

import structlog

from pvs_protocol import events as ev
from pvs_protocol.errors import ErrorCode
from pvsd.config import Config
from pvsd.session import Session, new_session_id
from pvsd.store import Catalog, VDisk

log = structlog.get_logger("pvsd.server")


class StreamState(enum.Enum):
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StreamServer:
    def __init__(self, config: Config, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.state = StreamState.STOPPED
        self.sessions: set[Session] = set()
        self.address = config.listen
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; only once this returns is the service started."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Session(self), self.config.listen_host, self.config.listen_port,
            reuse_address=True, backlog=1024,
        )
        sockname = self._server.sockets[0].getsockname()
        host, port = sockname[0], sockname[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.state = StreamState.SERVING
        log.info("listening", address=self.address, stores=[str(s) for s in self.config.stores])

    async def stop(self) -> None:
        """Stop taking targets, say goodbye to each, and wait (bounded) for them to go."""
        if self._server is None:
            return
        self.state = StreamState.STOPPING
        self._server.close()
        log.info("stream_service_stopping", targets=len(self.sessions))
        for session in list(self.sessions):
            session.close(ErrorCode.STOPPING, "server is stopping its stream service")
        waits = [session.wait_closed() for session in list(self.sessions)]
        if waits:
            try:
                async with asyncio.timeout(self.config.drain_timeout):
                    await asyncio.gather(*waits)
            except TimeoutError:
                for session in list(self.sessions):
                    if session.transport is not None:
                        session.transport.abort()
                log.warning("drain_timeout", aborted=len(self.sessions))
        await self._server.wait_closed()
        self._server = None
        self.state = StreamState.STOPPED
        log.info("stream_service_stopped")

    def register(self, session: Session) -> None:
        self.sessions.add(session)

    def unregister(self, session: Session) -> None:
        self.sessions.discard(session)

    def place(self, login: ev.Login, session: Session) -> ev.Error | ev.Redirect | tuple[
        VDisk, ev.LoginOk
    ]:
        """Decide where a login streams: here, elsewhere (redirect) or nowhere (error)."""
        if self.state is not StreamState.SERVING:
            return ev.Error(0, ErrorCode.STOPPING, "this server is stopping: log in elsewhere")
        vdisk = self.catalog.get(login.vdisk)
        if vdisk is None:
            return ev.Error(
                0, ErrorCode.UNKNOWN_VDISK,
                f"no vDisk named {login.vdisk!r} on {self.config.name}: check the name with "
                "'pvsctl vdisk show'",
            )
        identity = vdisk.identity
        if identity is None:
            return ev.Error(
                0, ErrorCode.IDENTITY_PENDING,
                f"{vdisk.name} is being verified (hashing): retry in a few seconds",
            )
        if login.pinned is not None and login.pinned != identity:
            differs = ", ".join(login.pinned.differences(identity))
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"replica of {vdisk.name} here differs in {differs} from the one the target "
                "streamed before",
            )
        props = vdisk.properties
        flags = ev.LoginFlag.READ_ONLY
        if props.load_balancing and not props.maintenance:
            flags |= ev.LoginFlag.FAILOVER
        return vdisk, ev.LoginOk(
            session_id=new_session_id(), identity=identity, block_size=props.block_size,
            mode=props.mode.code, flags=flags, server_name=self.config.name,
            server_address=session.local_address or self.address,
        )
