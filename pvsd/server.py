"""The stream service: listens for targets, owns their sessions, and shuts down in order.

It also owns what sessions share: the serving thread pool (and the record of which stores do
not answer, `pvsd.stalls`), the writer-lock decisions of Private Images, and the SITE frames
that keep streaming targets' lists of servers current.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from pathlib import Path

import structlog

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.buffers import BufferPool
from pvs_protocol.coordination import ServerState
from pvs_protocol.errors import ErrorCode
from pvs_protocol.modes import Mode
from pvsd import balance, locks
from pvsd.budget import BudgetKeeper, share
from pvsd.config import Config, format_address, parse_address
from pvsd.limits import SourceLimit
from pvsd.metrics import requests_of
from pvsd.serving import ServingIO
from pvsd.session import Session, new_session_id
from pvsd.site import LocalState, Site, replica_entry, replicas_of
from pvsd.stalls import StalledStores, Transition
from pvsd.store import Catalog, VDisk
from pvsd.versions import DeviceClass, device_class
from pvsd.workers import Workers

log = structlog.get_logger("pvsd.server")

SITE_UPDATE_INTERVAL = 0.25
"""SITE frames are coalesced: at most one per streaming target this often."""
LOCK_PROBE_TIMEOUT = 0.5
"""How long a connection to a lock holder's stream port may take. A refusal comes back at once
from a live host whose pvsd crashed; a host that does not answer in time may be frozen or cut
off, and keeps its lock until the site declares it down."""


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
        self.serving = ServingIO(config.io_threads, config.stall_timeout, self._stall_changed)
        """Serving I/O only (reads that miss the page cache, writes, fdatasync): hashing and
        scrubbing run in the catalog's pool, so they never make a target's read wait."""
        self._stalled = StalledStores()
        """Stores that do not answer, and where that was found: "pvsd" (this process's
        threads) or "worker N" (a stream worker's)."""
        self.lingering_writers: set[int] = set()
        """Sessions ended while their writes were still in worker threads: their writer
        locks stay held (see Session)."""
        self._crashed: dict[str, float] = {}
        """Peers found crashed by a lock probe: name -> when last heard (valid until heard
        again)."""
        self._site_sent: frozenset[str] = frozenset()
        self.relogins_sent: collections.Counter[str] = collections.Counter()
        """RELOGIN notices sent, by why (stop_stream, store_stalled), for pvsd.metrics."""
        self.budget: BudgetKeeper[Session] = BudgetKeeper(
            share(config.reply_budget, config.stream_workers), config.max_request
        )
        """Replies written and not yet sent, over this process's sessions (pvsd.budget)."""
        self.sources: SourceLimit[Session] = SourceLimit(config.max_connections_per_source)
        """Stream connections per source address."""
        self.workers: Workers | None = None
        """The stream workers (``stream_workers``) once started."""
        catalog.on_change(self._replica_changed)

    async def start(self) -> None:
        """Listen; only once this returns is the service started."""
        loop = asyncio.get_running_loop()
        if self.config.stream_workers and self.workers is None:
            self.workers = Workers(self.config, requests_of(self).add, self.worker_stalls)
            await self.workers.start()
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
        # Peers hear of it before the port closes: a peer that finds our port refusing
        # connections while we say SERVING takes our writer locks over (probe_lock_holder).
        self._announce()
        self._server.close()
        deadline = self.config.drain_timeout
        streaming = [s for s in self.sessions if s.streaming]
        log.info("stream_service_stopping", targets=len(streaming), drain_seconds=deadline)
        for session in list(self.sessions):
            if session.streaming:
                self.relogins_sent["stop_stream"] += 1
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
                    session.abort()
        await self._server.wait_closed()
        self._server = None
        self.state = StreamState.STOPPED
        self._announce()
        log.info("stream_service_stopped")

    def close(self) -> None:
        """At exit: threads stuck on a store that does not answer are not waited for."""
        self.serving.close()

    async def stop(self) -> None:
        """SIGTERM: the same orderly move of targets as stop-stream, then the workers end."""
        await self.stop_stream()
        if self.workers is not None:
            await self.workers.close()

    def _replica_changed(self, _name: str, vdisk: VDisk | None) -> None:
        if self.workers is None:  # sessions here check their replica at each request
            return
        for session in list(self.sessions):
            if session.remote is not None and (vdisk is None or session.vdisk is vdisk):
                session.check_replica()

    def _announce(self) -> None:
        if self.site is not None:
            self.site.announce()

    def register(self, session: Session) -> str | None:
        """A connection was accepted: own its session, or say why it is refused (its address
        holds ``max_connections_per_source`` sessions already, all logged in; the session
        says GOODBYE and closes). At the cap, the oldest session of the address still in
        its handshake makes room instead (told so the same way)."""
        source = session.peer_ip
        sources = self.sources
        admission = sources.admit(source, session, _logged_in)
        if admission.first:
            log.warning(
                "connections_over_cap", source=source, cap=sources.cap,
                refused=not admission.admitted,
                action=f"{source} holds {sources.cap} stream connections (max_connections_per_"
                "source): new ones replace its oldest that have not logged in, or are refused "
                "while all have. Many targets behind one NAT address need a larger max_"
                "connections_per_source; otherwise that host opens connections it does not use",
            )
        if not admission.admitted:
            return (
                f"too many connections from {source} (at most {sources.cap} per address): "
                "close unused ones, or ask the administrator to raise "
                "max_connections_per_source"
            )
        if admission.replaces is not None:
            admission.replaces.close(
                ErrorCode.BUSY, f"too many connections from {source} (at most {sources.cap} "
                "per address): this one, not logged in, made room for a newer one",
            )
        self.sessions.add(session)
        return None

    def unregister(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            dropped = self.sources.left(session.peer_ip, session)
            if dropped:
                log.info("connections_under_cap", source=session.peer_ip,
                         refused_or_replaced=dropped, cap=self.sources.cap)
            self.budget.forget(session)
            self._bytes_done += session.bytes_read + session.bytes_written
            if session.vdisk is not None:
                self.targets_changed()

    # -- the reply budget --------------------------------------------------------------------

    def replies_unsent(self, session: Session, unsent: int) -> None:
        """A session's transport holds ``unsent`` bytes of replies (see ``Lent``)."""
        if session in self.sessions:
            self.budget.unsent(session, unsent)

    def targets_changed(self) -> None:
        """A target came or went: peers hear our new count within a few tens of ms, not at
        the next heartbeat, so that a burst of logins is spread by what each server really
        carries (and rebalancing reads the same)."""
        if self.site is not None:
            self.site.heartbeat_soon()

    def place(
        self, login: ev.Login, session: Session
    ) -> ev.Error | ev.Redirect | tuple[VDisk, ev.LoginOk]:
        """Decide where a login streams: here, elsewhere (redirect) or nowhere (error).

        A redirected login is served here or refused, never sent on: no loop can form.
        """
        if self.state is not StreamState.SERVING:
            return ev.Error(0, ErrorCode.STOPPING, "this server is stopping: log in elsewhere")
        device = self.device_class(login.vdisk, login.device_id)
        if self.site is not None and not login.redirected:
            choice = balance.choose(
                self.site.view(), login.vdisk, me=self.config.name,
                target_ip=session.peer_ip, pinned=login.pinned, avoid=login.avoid,
                device=device,
            )
            if isinstance(choice, balance.Refusal):
                return ev.Error(0, choice.code, choice.message)
            if choice.server != self.config.name:
                self.site.note_placement(choice.server)
                return ev.Redirect(choice.server, choice.address, "least busy server")
        return self._accept_here(login, session, device)

    def device_class(self, vdisk: str, device_id: str) -> DeviceClass:
        """The device's class for this vDisk, from our copy's properties (every version's)."""
        versions = self.catalog.versions(vdisk)
        if not versions:
            return DeviceClass.ordinary
        props = versions[max(versions)].properties
        return device_class(
            device_id, test=props.test_devices, maintenance=props.maintenance_devices
        )

    def view(self) -> list[balance.ServerView]:
        """The site as placement sees it; without a site, this server alone."""
        if self.site is not None:
            return self.site.view()
        state = self.local_state()
        return [balance.ServerView(
            self.config.name, self.advertised, state.serving is ServerState.SERVING,
            self.config.power, state.targets, (), replicas_of(state.replicas.values()),
        )]

    def _choose_version(
        self, login: ev.Login, device: DeviceClass
    ) -> ev.Error | VDisk:
        """Our copy of the version this login gets: the one it pinned, else the one its
        device class gets now (the same choice the login server made)."""
        versions = self.catalog.versions(login.vdisk)
        if not versions:
            return ev.Error(
                0, ErrorCode.UNKNOWN_VDISK,
                f"no vDisk named {login.vdisk!r} on {self.config.name}: check the name with "
                "'pvsctl vdisks'",
            )
        if login.pinned is not None:
            number: int | None = login.pinned.version
        else:
            view = self.view()
            mine = [s for s in view if s.name == self.config.name]
            wanted = balance.wanted_identity(view, login.vdisk, device)
            if wanted is None or not mine or wanted.version not in mine[0].replicas.get(
                login.vdisk, {}
            ):
                wanted = balance.wanted_identity(mine, login.vdisk, device)
            if wanted is not None:
                number = wanted.version
            else:  # nothing checked yet: the newest it may get, refused as pending below
                allowed = [n for n, v in versions.items() if device.may_get(v.state)]
                number = max(allowed) if allowed else None
        vdisk = versions.get(number) if number is not None else None
        if vdisk is None:
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"{self.config.name} holds no copy of the version of {login.vdisk} this "
                f"target gets (version {number}): log in at another server of the site",
            )
        if not device.may_get(vdisk.state):
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"version {vdisk.version} of {login.vdisk} is in {vdisk.state}: {device} "
                "devices do not get it (see pvsctl vdisk versions)",
            )
        return vdisk

    def _accept_here(
        self, login: ev.Login, session: Session, device: DeviceClass
    ) -> ev.Error | tuple[VDisk, ev.LoginOk]:
        chosen = self._choose_version(login, device)
        if isinstance(chosen, ev.Error):
            return chosen
        vdisk = chosen
        if vdisk.properties.maintenance and device is not DeviceClass.maintenance:
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"{vdisk.name} is in maintenance: only its maintenance devices get it",
            )
        identity = vdisk.identity
        if vdisk.damage is not None:
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"{vdisk.name} on {self.config.name} is damaged (first bad offset "
                f"{vdisk.damage.first_offset}): log in at another server of the site",
            )
        if self.store_stalled(vdisk.store.path):
            return ev.Error(
                0, ErrorCode.NO_IDENTICAL_REPLICA,
                f"the store of {vdisk.name} on {self.config.name} is not answering (stalled "
                "I/O): log in at another server of the site",
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
        props, mode = vdisk.properties, vdisk.mode
        flags = ev.LoginFlag.READ_ONLY if mode is Mode.standard else ev.LoginFlag(0)
        if balance.failover_allowed(self.replica(vdisk)):
            flags |= ev.LoginFlag.FAILOVER
        session_id = new_session_id()
        if mode is Mode.private:
            owner = locks.Owner(self.config.name, session_id, login.device_id, time.time())
            try:
                locks.acquire(
                    vdisk.path, owner, gone=lambda held: self._writer_gone(held, owner.device)
                )
            except locks.Busy as busy:
                return ev.Error(0, ErrorCode.BUSY, str(busy))
        return vdisk, ev.LoginOk(
            session_id=session_id, identity=identity, block_size=props.block_size,
            mode=mode.code, flags=flags, server_name=self.config.name,
            server_address=self.advertised, site=self._site_addresses(),
        )

    def _writer_gone(self, held: locks.Owner, device: str) -> str | None:
        """Why a lock holder no longer writes, or None while it may: a session of ours that
        still exists (or whose writes are still in threads), or a server the site sees and
        that has not been found crashed."""
        if held.server == self.config.name and held.session in self.lingering_writers:
            return None  # its late writes could land under the next writer
        if held.device == device:
            return "the same device logs in again (its old connection broke)"
        if held.server == self.config.name:
            if any(s.session_id == held.session for s in self.sessions):
                return None
            return "its session on this server has ended"
        if self.site is None:
            return None  # a server we cannot see may well be alive: never steal its lock
        peer = self.site.peers.get(held.server)
        if peer is None:
            return None
        if not peer.up:
            return f"server {held.server} is declared down (silent for over peer_timeout)"
        if self._crashed.get(held.server) == peer.last_heard:
            return (
                f"server {held.server} crashed: its stream port refused a connection and it "
                "sent no heartbeat since"
            )
        return None

    def lock_holder_to_probe(self, login: ev.Login) -> locks.Owner | None:
        """The holder of a Private Image's writer lock on a shared store whose server must
        be probed before a login can know whether it is gone; None when the sync rules
        decide (no lock, our own, a server down or unknown, one found crashed already)."""
        if self.site is None or self.state is not StreamState.SERVING:
            return None
        vdisk = self._choose_version(login, self.device_class(login.vdisk, login.device_id))
        if isinstance(vdisk, ev.Error) or vdisk.mode is not Mode.private or not vdisk.store.shared:
            return None
        holder = locks.read_owner(vdisk.path)
        if holder is None or holder.server in (self.config.name, "?"):
            return None
        peer = self.site.peers.get(holder.server)
        if peer is None or not peer.up or peer.heartbeat.state is not ServerState.SERVING:
            return None  # a stopping server's port is closed by design: never a crash sign
        if self._crashed.get(holder.server) == peer.last_heard:
            return None
        return holder

    async def probe_lock_holder(self, holder: locks.Owner) -> None:
        """Find out whether the server holding a writer lock crashed, well before the site's
        peer timeout would say so.

        A refused connection to its stream port means no process listens there: pvsd died
        (a frozen or cut-off server still has its socket, or does not answer at all, and keeps
        its lock until declared down). A server that stops its stream service announces it
        before closing the port, so a refusal while the site still sees it SERVING and no
        heartbeat for 1.5 heartbeat intervals (one lost datagram tolerated) is a crash; the
        login waits at most that long (0.75 s by default).
        """
        assert self.site is not None
        peer = self.site.peers.get(holder.server)
        if peer is None:
            return
        heard = peer.last_heard
        try:
            host, port = parse_address(peer.heartbeat.stream_address)
            async with asyncio.timeout(LOCK_PROBE_TIMEOUT):
                _reader, writer = await asyncio.open_connection(host, port)
        except ConnectionRefusedError:
            pass
        except (OSError, TimeoutError, ValueError):
            return  # unreachable, or not answering: only the site's verdict frees its lock
        else:
            writer.close()  # a process listens there: its writer may well be alive
            return
        quiet = 1.5 * self.config.heartbeat_interval
        await asyncio.sleep(max(0.0, heard + quiet - time.monotonic()))
        if (
            peer.last_heard != heard or not peer.up
            or peer.heartbeat.state is not ServerState.SERVING
        ):
            return
        self._crashed[holder.server] = heard
        log.warning(
            "lock_holder_crashed", server=holder.server, device=holder.device,
            silent_for=round(time.monotonic() - heard, 2),
            hint="its stream port refuses connections and it fell silent: its writer locks "
            "are taken over by the next login",
        )

    def peer_down(self, name: str) -> None:
        """A declared-down server cannot release its writer locks: release them for it."""
        for vdisk in self.catalog.values():
            if vdisk.store.shared and vdisk.mode is Mode.private:
                locks.release_server(vdisk.path, name)

    # -- serving I/O and stalled stores ------------------------------------------------------

    def store_stalled(self, store: Path) -> bool:
        return self._stalled.stalled(store)

    def _stall_changed(self, store: Path, stalled: bool, where: str = "pvsd") -> None:
        """``store`` stalled (or answers again) in this process's threads or in a stream
        worker's: the site sees one server, whose store stalls when any of them finds so and
        recovers once none does."""
        match self._stalled.change(store, where, stalled):
            case Transition.STALLED:
                self._store_stalled(store)
            case Transition.RECOVERED:
                log.warning(
                    "store_recovered", store=str(store),
                    hint="its requests complete again: its replicas are served again",
                )
                self._inventory_changed()

    def worker_stalls(self, where: str, stores: dict[Path, bool]) -> None:
        """What a stream worker found (or, when it ended, forgot) of its stores."""
        for store, stalled in stores.items():
            self._stall_changed(store, stalled, where)

    def _store_stalled(self, store: Path) -> None:
        """Stop counting on a store that does not answer: its replicas leave the site's
        inventory, logins to them are refused, and its streaming targets are asked to move
        (RELOGIN, without closing: a target with nowhere else to go stays and is served
        again once the store answers)."""
        moving = [
            s for s in self.sessions
            if s.streaming and s.vdisk is not None and s.vdisk.store.path == store
        ]
        log.error(
            "store_stalled", store=str(store), seconds=self.config.stall_timeout,
            found_by=self._stalled.found_by(store),
            in_threads=self.serving.waiting(store), targets_moved=len(moving),
            action=f"requests to {store} have not completed for {self.config.stall_timeout:g} "
            "s: check the disk or network share under it; its targets are sent to other "
            "servers, and it is served again once its requests complete",
        )
        self._inventory_changed()
        site = self._site_addresses()
        self.relogins_sent["store_stalled"] += len(moving)
        for session in moving:
            session.send(
                ev.Relogin(
                    int(self.config.drain_timeout * 1000),
                    f"the store of {self.config.name} is not answering", site,
                )
            )

    def _inventory_changed(self) -> None:
        if self.site is not None:
            self.site.inventory_changed()

    # -- the site, as targets see it ---------------------------------------------------------

    async def send_site_updates(self) -> None:
        """Send SITE to every streaming target when the servers a LOGIN_OK would name change
        (one added, stopped, down or back), coalesced; until cancelled. A change of their
        order alone (loads move all the time) is not sent."""
        while True:
            await asyncio.sleep(SITE_UPDATE_INTERVAL)
            if self.state is not StreamState.SERVING:
                continue
            addresses = self._site_addresses()
            if frozenset(addresses) == self._site_sent:
                continue
            self._site_sent = frozenset(addresses)
            update = ev.SiteUpdate(addresses)
            streaming = [s for s in self.sessions if s.streaming]
            for session in streaming:
                session.send(update)
            log.info("site_sent", servers=list(addresses), targets=len(streaming))

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
            mode=vdisk.mode, maintenance=props.maintenance,
            load_balancing=props.load_balancing, fixed_server=props.fixed_server,
            affinity=props.subnet_affinity, shared=vdisk.store.shared,
            damaged=vdisk.damage is not None, version=vdisk.version, state=vdisk.state,
        )

    def local_state(self) -> LocalState:
        now = time.monotonic()
        total = self._bytes_done + sum(s.bytes_read + s.bytes_written for s in self.sessions)
        elapsed = now - self._rate_sample[0]
        if elapsed >= 1.0:
            self._rate = int((total - self._rate_sample[1]) / elapsed)
            self._rate_sample = (now, total)
        replicas = {}
        for (name, version), vdisk in sorted(self.catalog.by_version().items()):
            r = self.replica(vdisk)
            # a stalled store's replicas are not served: no identity while it is stalled
            identity = None if self.store_stalled(vdisk.store.path) else r.identity
            replicas[name, version] = replica_entry(
                name, identity, mode=r.mode, maintenance=r.maintenance,
                load_balancing=r.load_balancing, fixed_server=r.fixed_server,
                affinity=r.affinity, shared=r.shared, damage=vdisk.damage,
                version=version, state=r.state,
            )
        return LocalState(
            serving=_SITE_STATE[self.state],
            targets=sum(1 for s in self.sessions if s.streaming),
            bytes_per_second=self._rate, replicas=replicas,
        )


def _logged_in(session: Session) -> bool:
    return session.streaming


_SITE_STATE = {
    StreamState.SERVING: ServerState.SERVING,
    StreamState.STOPPING: ServerState.STOPPING,
    StreamState.STOPPED: ServerState.STOPPED,
}
