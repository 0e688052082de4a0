"""The stream service: listens for targets, owns their sessions, and shuts down in order."""

from __future__ import annotations

import asyncio
import enum
import time

import structlog

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.buffers import BufferPool
from pvs_protocol.coordination import ServerState
from pvs_protocol.errors import ErrorCode
from pvs_protocol.modes import Mode
from pvsd import balance, locks
from pvsd.config import Config, format_address
from pvsd.session import Session, new_session_id
from pvsd.site import LocalState, Site, replica_entry
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
        # The catalog's watch owns the scrub; the settings are the server's.
        catalog.scrub_rate, catalog.scrub_interval = config.scrub_rate, config.scrub_interval
        self.buffers = BufferPool()
        self.state = StreamState.STOPPED
        self.sessions: set[Session] = set()
        self.address = config.listen
        self._server: asyncio.Server | None = None
        self._bound_port = 0
        self.catalog_paths = [*config.stores, *config.shared_stores]
        self.site: Site | None = None
        self._bytes_done = 0
        self._rate = 0
        self._rate_sample = (time.monotonic(), 0)

    async def start(self) -> None:
        """Listen; only once this returns is the service started."""
        loop = asyncio.get_running_loop()
        host, port = self.config.listen_host, self.config.listen_port
        if self._bound_port:  # a restart keeps the port it had (listen port 0 in tests)
            port = self._bound_port
        self._server = await loop.create_server(
            lambda: Session(self), host, port, reuse_address=True, backlog=1024
        )
        sockname = self._server.sockets[0].getsockname()
        self._bound_port = sockname[1]
        self.address = format_address(sockname[0], sockname[1])
        self.state = StreamState.SERVING
        self._announce()
        log.info("listening", address=self.address, stores=[str(s) for s in self.catalog_paths])

    async def start_stream(self) -> None:
        """Bring a stopped stream service back (pvsctl start-stream)."""
        if self.state is StreamState.STOPPED:
            await self.start()
            log.info("stream_service_started")

    async def stop_stream(self) -> None:
        """Move every target elsewhere, then stop: the documented way to empty a server.

        No new logins; each streaming target gets a RELOGIN notice and keeps being served
        while it logs in elsewhere, so its reads never wait. Whoever has not left by the
        drain deadline is told GOODBYE and disconnected.
        """
        if self.state is not StreamState.SERVING or self._server is None:
            return
        self.state = StreamState.STOPPING
        self._server.close()
        self._announce()
        deadline = self.config.drain_timeout
        streaming = [s for s in self.sessions if s.streaming]
        log.info("stream_service_stopping", targets=len(streaming), drain_seconds=deadline)
        for session in list(self.sessions):
            if session.streaming:
                session.send(
                    ev.Relogin(
                        int(deadline * 1000), f"{self.config.name} is stopping",
                        self._site_addresses(),
                    )
                )
            else:
                session.close(ErrorCode.STOPPING, "server is stopping its stream service")
        waits = [session.wait_closed() for session in list(self.sessions)]
        if waits:
            try:
                async with asyncio.timeout(deadline):
                    await asyncio.gather(*waits)
            except TimeoutError:
                stragglers = list(self.sessions)
                log.warning(
                    "drain_timeout", targets=len(stragglers),
                    hint="these targets did not log in elsewhere in time; closing them",
                )
                for session in stragglers:
                    session.close(ErrorCode.STOPPING, "drain deadline passed")
                await asyncio.sleep(0.2)
                for session in list(self.sessions):
                    if session.transport is not None:
                        session.transport.abort()
        await self._server.wait_closed()
        self._server = None
        self.state = StreamState.STOPPED
        self._announce()
        log.info("stream_service_stopped")

    async def stop(self) -> None:
        """SIGTERM: the same orderly move of targets as stop-stream."""
        await self.stop_stream()

    def _announce(self) -> None:
        if self.site is not None:
            self.site.announce()

    def register(self, session: Session) -> None:
        self.sessions.add(session)

    def unregister(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._bytes_done += session.bytes_read + session.bytes_written

    def place(
        self, login: ev.Login, session: Session
    ) -> ev.Error | ev.Redirect | tuple[VDisk, ev.LoginOk]:
        """Decide where a login streams: here, elsewhere (redirect) or nowhere (error).

        A redirected login is served here or refused, never sent on: no loop can form.
        """
        if self.state is not StreamState.SERVING:
            return ev.Error(0, ErrorCode.STOPPING, "this server is stopping: log in elsewhere")
        if self.site is not None and not login.redirected:
            choice = balance.choose(
                self.site.view(), login.vdisk, me=self.config.name,
                target_ip=session.peer_ip, pinned=login.pinned, avoid=login.avoid,
            )
            if isinstance(choice, balance.Refusal):
                return ev.Error(0, choice.code, choice.message)
            if choice.server != self.config.name:
                self.site.note_placement(choice.server)
                return ev.Redirect(choice.server, choice.address, "least busy server")
        return self._accept_here(login, session)

    def _accept_here(
        self, login: ev.Login, session: Session
    ) -> ev.Error | tuple[VDisk, ev.LoginOk]:
        vdisk = self.catalog.get(login.vdisk)
        if vdisk is None:
            return ev.Error(
                0, ErrorCode.UNKNOWN_VDISK,
                f"no vDisk named {login.vdisk!r} on {self.config.name}: check the name with "
                "'pvsctl vdisks'",
            )
        identity = vdisk.identity
        if vdisk.damage is not None:
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"{vdisk.name} on {self.config.name} is damaged (first bad offset "
                f"{vdisk.damage.first_offset}): log in at another server of the site",
            )
        if identity is None:
            return ev.Error(
                0, ErrorCode.IDENTITY_PENDING,
                f"{vdisk.name} is being checked against its manifest: retry in a few seconds",
            )
        if login.pinned is not None and login.pinned != identity:
            differs = ", ".join(login.pinned.differences(identity))
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"replica of {vdisk.name} here differs in {differs} from the one the target "
                "streamed before",
            )
        props = vdisk.properties
        flags = ev.LoginFlag.READ_ONLY if props.mode is Mode.standard else ev.LoginFlag(0)
        if balance.failover_allowed(self.replica(vdisk)):
            flags |= ev.LoginFlag.FAILOVER
        session_id = new_session_id()
        if props.mode is Mode.private:
            owner = locks.Owner(self.config.name, session_id, login.device_id, time.time())
            try:
                locks.acquire(
                    vdisk.path, owner,
                    # the same device coming back (its old connection broke) takes its lock over
                    alive=lambda held: held.device != owner.device and self._writer_alive(held),
                )
            except locks.Busy as busy:
                return ev.Error(0, ErrorCode.BUSY, str(busy))
        return vdisk, ev.LoginOk(
            session_id=session_id, identity=identity, block_size=props.block_size,
            mode=props.mode.code, flags=flags, server_name=self.config.name,
            server_address=self.advertised, site=self._site_addresses(),
        )

    def _writer_alive(self, owner: locks.Owner) -> bool:
        """Whether a lock holder still writes: our own session, or a server the site sees."""
        if owner.server == self.config.name:
            return any(s.session_id == owner.session for s in self.sessions)
        if self.site is None:
            return True  # a server we cannot see may well be alive: never steal its lock
        peer = self.site.peers.get(owner.server)
        return peer is None or peer.up

    def peer_down(self, name: str) -> None:
        """A declared-down server cannot release its writer locks: release them for it."""
        for vdisk in self.catalog.values():
            if vdisk.store.shared and vdisk.properties.mode is Mode.private:
                locks.release_server(vdisk.path, name)

    def _site_addresses(self) -> tuple[str, ...]:
        if self.site is None:
            return ()
        servers = [s for s in self.site.view() if s.serving and s.name != self.config.name]
        servers.sort(key=lambda s: s.load)
        return tuple(s.address for s in servers[: wire.MAX_SITE_ADDRESSES])

    # -- what the site sees of us -----------------------------------------------------------

    @property
    def advertised(self) -> str:
        return self.config.advertise or self.address

    def replica(self, vdisk: VDisk) -> balance.Replica:
        props = vdisk.properties
        return balance.Replica(
            identity=vdisk.identity if vdisk.damage is None else vdisk.known_identity,
            mode=props.mode, maintenance=props.maintenance,
            load_balancing=props.load_balancing, fixed_server=props.fixed_server,
            affinity=props.subnet_affinity, shared=vdisk.store.shared,
            damaged=vdisk.damage is not None,
        )

    def local_state(self) -> LocalState:
        now = time.monotonic()
        total = self._bytes_done + sum(s.bytes_read + s.bytes_written for s in self.sessions)
        elapsed = now - self._rate_sample[0]
        if elapsed >= 1.0:
            self._rate = int((total - self._rate_sample[1]) / elapsed)
            self._rate_sample = (now, total)
        replicas = {}
        for name, vdisk in self.catalog.items():
            r = self.replica(vdisk)
            replicas[name] = replica_entry(
                name, r.identity, mode=r.mode, maintenance=r.maintenance,
                load_balancing=r.load_balancing, fixed_server=r.fixed_server,
                affinity=r.affinity, shared=r.shared, damage=vdisk.damage,
            )
        return LocalState(
            serving=_SITE_STATE[self.state],
            targets=sum(1 for s in self.sessions if s.streaming),
            bytes_per_second=self._rate, replicas=replicas,
        )


_SITE_STATE = {
    StreamState.SERVING: ServerState.SERVING,
    StreamState.STOPPING: ServerState.STOPPING,
    StreamState.STOPPED: ServerState.STOPPED,
}
