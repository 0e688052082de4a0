"""The site: this server's view of its peers, kept fresh over the coordination channel.

Each server sends a HEARTBEAT (state, power, load) to every peer every ``heartbeat_interval``
and its replica INVENTORY on every change and every ``inventory_interval``, over UDP on the
same port number as its stream service. What arrives is authenticated, checked against
replays, and folded into a view; a peer not heard from for ``peer_timeout`` is down. Placement
decisions read ``view()``; they never wait on the network.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from pvs_protocol import coordination as co
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode, SubnetAffinity, VersionState
from pvsd.balance import Network, Replica, ServerView
from pvsd.config import Config, ConfigError, format_address, parse_address

log = structlog.get_logger("pvsd.site")

HEARTBEAT_COALESCE = 0.05
"""A change of our target count is sent after this long, with whatever else changed by then."""


@dataclasses.dataclass
class Peer:
    """What we know of one other server."""

    name: str
    source: tuple[str, int]
    heartbeat: co.Heartbeat
    last_heard: float
    up: bool = True
    inventory: dict[tuple[str, int], co.ReplicaEntry] = dataclasses.field(default_factory=dict)
    """(vDisk, version) -> the peer's copy of that version."""
    inventory_generation: int = -1
    partial: dict[int, co.InventoryChunk] = dataclasses.field(default_factory=dict)
    partial_generation: int = -1
    epoch: int = 0
    """The peer's process start: a new one restarts its inventory generations."""

    @property
    def admin_address(self) -> str | None:
        """The peer's admin address; a wildcard host is replaced by the address it sends
        from. None when it announces none (or one that cannot be parsed)."""
        address = self.heartbeat.admin_address
        if not address:
            return None
        try:
            host, port = parse_address(address)
        except ConfigError:
            return None
        try:
            if ipaddress.ip_address(host).is_unspecified:
                host = str(self.source[0])
        except ValueError:
            pass  # a host name
        return format_address(host, port)


@dataclasses.dataclass(frozen=True, slots=True)
class LocalState:
    """This server's own part of the view, as the stream service reports it."""

    serving: co.ServerState
    targets: int
    bytes_per_second: int
    replicas: dict[tuple[str, int], co.ReplicaEntry]
    """(vDisk, version) -> our copy of that version."""


class Site(asyncio.DatagramProtocol):
    def __init__(
        self, config: Config, local: Callable[[], LocalState], stream_address: str
    ) -> None:
        self.config = config
        self.local = local
        self.stream_address = stream_address
        self.peers: dict[str, Peer] = {}
        self.dropped: collections.Counter[str] = collections.Counter()
        self.received = 0
        self.on_peer_down: list[Callable[[str], None]] = []
        self.on_peer_up: list[Callable[[str], None]] = []
        """Called with a peer's name when it joins, is up again or serves again."""
        self._guard = co.ReplayGuard()
        self._epoch = time.time_ns()
        self._seq = 0
        self._generation = 0
        self._inventory_sent: dict[tuple[str, int], co.ReplicaEntry] | None = None
        self._inventory_due = 0.0
        self._last_chunks: list[co.InventoryChunk] = []
        self._placed: dict[str, list[float]] = collections.defaultdict(list)
        self._transport: asyncio.DatagramTransport | None = None
        self._soon: asyncio.TimerHandle | None = None
        self._targets = [parse_address(p) for p in config.peers]
        self._subnets = _subnets(config)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Send and listen until cancelled."""
        loop = asyncio.get_running_loop()
        port = parse_address(self.stream_address)[1]
        bind_host = self.config.listen_host
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=(bind_host, port)
        )
        log.info("site_channel_open", address=f"{bind_host}:{port}/udp", peers=len(self._targets))
        try:
            while True:
                self._tick(time.monotonic())
                await asyncio.sleep(self.config.heartbeat_interval)
        finally:
            if self._soon is not None:
                self._soon.cancel()
                self._soon = None
            self._transport.close()

    def announce(self) -> None:
        """Our state changed (stopping, stopped, serving): tell the peers now, not next tick."""
        if self._transport is not None:
            self._tick(time.monotonic())

    def heartbeat_soon(self) -> None:
        """Our load changed: send a heartbeat shortly, once for a burst of changes."""
        if self._transport is None or self._soon is not None:
            return
        self._soon = asyncio.get_running_loop().call_later(HEARTBEAT_COALESCE, self._beat_now)

    def _beat_now(self) -> None:
        self._soon = None
        if self._transport is not None and not self._transport.is_closing():
            self._tick(time.monotonic())

    def inventory_changed(self) -> None:
        """Called when a replica appears, goes, or changes identity: tell the peers at once."""
        self._inventory_due = 0.0
        if self._transport is not None:
            self._tick(time.monotonic(), heartbeat=False)

    # -- sending ----------------------------------------------------------------------------

    def _tick(self, now: float, *, heartbeat: bool = True) -> None:
        state = self.local()
        try:
            chunks = self._inventory_chunks(state, now)
        except ValueError as error:  # an entry too long for one datagram: say which
            log.error("site_inventory_unsendable", error=str(error),
                      hint="shorten the vDisk's fixed_server setting")
            chunks = []
        beat = co.Heartbeat(
            name=self.config.name, stream_address=self.stream_address,
            admin_address=self.config.admin, state=state.serving, power=self.config.power,
            targets=state.targets, bytes_per_second=state.bytes_per_second,
            inventory_generation=self._generation,
            inventory_chunks=max(1, len(self._last_chunks)), subnets=tuple(map(str, self._subnets)),
        )
        messages: list[co.Message] = [beat] if heartbeat or chunks else []
        messages += chunks
        for message in messages:
            self._seq += 1
            envelope = co.Envelope(self._epoch, self._seq, int(time.time() * 1000), message)
            try:
                datagram = co.encode(envelope, self.config.site_key)
            except ValueError as error:  # a setting too long for the channel: say which
                log.error("site_message_too_large", error=str(error),
                          hint="shorten the vDisk's fixed_server or the list of subnets")
                continue
            for target in self._targets:
                self._send(datagram, target)
        self._check_peers(now)

    def _inventory_chunks(self, state: LocalState, now: float) -> list[co.InventoryChunk]:
        changed = state.replicas != self._inventory_sent
        if not changed and now < self._inventory_due:
            return []
        if changed:
            self._generation += 1
            self._inventory_sent = state.replicas
            entries = [state.replicas[name] for name in sorted(state.replicas)]
            self._last_chunks = co.chunk_inventory(self.config.name, self._generation, entries)
        self._inventory_due = now + self.config.inventory_interval
        return self._last_chunks

    def _send(self, datagram: bytes, target: tuple[str, int]) -> None:
        assert self._transport is not None
        try:
            self._transport.sendto(datagram, target)
        except OSError as error:  # unreachable network: the peer will time out, say so once
            log.debug("site_send_failed", peer=f"{target[0]}:{target[1]}", error=str(error))

    # -- receiving --------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            envelope = co.decode(data, self.config.site_key)
            sender = envelope.message.name
            if sender == self.config.name:
                raise co.CoordinationError("own", "a message with our own name (name clash?)")
            self._guard.check(sender, envelope, int(time.time() * 1000))
        except co.CoordinationError as error:
            count = self.dropped[error.reason] = self.dropped[error.reason] + 1
            if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th...: a bad peer cannot flood the log
                log.warning(
                    "site_message_dropped", source=f"{addr[0]}:{addr[1]}", reason=error.reason,
                    error=str(error), dropped=count,
                    hint="a server with another site key or version, or forged traffic",
                )
            return
        self.received += 1
        now = time.monotonic()
        message = envelope.message
        peer = self.peers.get(sender)
        back = peer is None or not peer.up or envelope.epoch != peer.epoch or (
            peer.heartbeat.state is not co.ServerState.SERVING
        )  # joined, up again, restarted or serving again: on_peer_up once it serves
        if peer is not None and envelope.epoch != peer.epoch:
            if peer.epoch:
                log.info("peer_restarted", peer=sender)
            peer.epoch = envelope.epoch
            peer.inventory_generation = peer.partial_generation = -1
            peer.partial = {}
        if isinstance(message, co.Heartbeat):
            if peer is None:
                peer = self.peers[sender] = Peer(sender, addr, message, now, epoch=envelope.epoch)
                log.info("peer_joined", peer=sender, address=message.stream_address)
            peer.heartbeat, peer.last_heard, peer.source = message, now, addr
            if not peer.up:
                peer.up = True
                log.info("peer_up", peer=sender, address=message.stream_address)
            self._placed.pop(sender, None)
            if back and message.state is co.ServerState.SERVING:
                for up_callback in self.on_peer_up:
                    up_callback(sender)
        elif peer is not None:
            peer.last_heard = now
            self._add_chunk(peer, message)

    def error_received(self, exc: Exception) -> None:
        log.debug("site_socket_error", error=str(exc))

    def _add_chunk(self, peer: Peer, chunk: co.InventoryChunk) -> None:
        if chunk.generation < peer.partial_generation:
            return
        if chunk.generation != peer.partial_generation:
            peer.partial, peer.partial_generation = {}, chunk.generation
        peer.partial[chunk.index] = chunk
        if len(peer.partial) == chunk.count and chunk.generation != peer.inventory_generation:
            peer.inventory = {
                e.key: e for c in peer.partial.values() for e in c.entries
            }
            peer.inventory_generation = chunk.generation
            log.info(
                "peer_inventory", peer=peer.name, vdisks=len(peer.inventory),
                generation=chunk.generation,
            )

    def _check_peers(self, now: float) -> None:
        for peer in self.peers.values():
            if peer.up and now - peer.last_heard > self.config.peer_timeout:
                peer.up = False
                log.warning(
                    "peer_down", peer=peer.name, silent_for=round(now - peer.last_heard, 1),
                    hint="no logins go to it until it speaks again",
                )
                for callback in self.on_peer_down:
                    callback(peer.name)

    # -- the view ---------------------------------------------------------------------------

    def note_placement(self, server: str) -> None:
        """Count a redirect we just made until that server's next heartbeat includes it,
        so that a burst of logins is spread rather than sent to one stale 'least busy'."""
        self._placed[server].append(time.monotonic())

    def view(self) -> list[ServerView]:
        state = self.local()
        servers = [
            ServerView(
                name=self.config.name, address=self.stream_address,
                serving=state.serving is co.ServerState.SERVING, power=self.config.power,
                targets=state.targets, subnets=self._subnets,
                replicas=replicas_of(state.replicas.values()),
            )
        ]
        for peer in self.peers.values():
            beat = peer.heartbeat
            servers.append(
                ServerView(
                    name=peer.name, address=beat.stream_address,
                    serving=peer.up and beat.state is co.ServerState.SERVING, power=beat.power,
                    targets=beat.targets + len(self._placed.get(peer.name, ())),
                    subnets=tuple(n for n in map(_network, beat.subnets) if n is not None),
                    replicas=replicas_of(peer.inventory.values()),
                )
            )
        return servers


class Damage(Protocol):
    """What the site tells of a damaged replica (the store's record has more)."""

    @property
    def first_offset(self) -> int: ...

    @property
    def bad_blocks(self) -> int: ...


def replica_of(entry: co.ReplicaEntry) -> Replica:
    return Replica(
        identity=entry.identity, mode=Mode.from_code(entry.mode), maintenance=entry.maintenance,
        load_balancing=entry.load_balancing, fixed_server=entry.fixed_server,
        affinity=SubnetAffinity.from_code(entry.affinity), shared=entry.shared,
        damaged=entry.damaged, version=entry.version,
        state=VersionState.from_code(entry.state),
    )


def replicas_of(entries: Iterable[co.ReplicaEntry]) -> dict[str, dict[int, Replica]]:
    """vDisk -> version -> replica, as placement reads a server's copies."""
    replicas: dict[str, dict[int, Replica]] = {}
    for entry in entries:
        replicas.setdefault(entry.vdisk, {})[entry.version] = replica_of(entry)
    return replicas


def replica_entry(
    name: str, identity: ReplicaIdentity | None, *, mode: Mode, maintenance: bool,
    load_balancing: bool, fixed_server: str, affinity: SubnetAffinity, shared: bool,
    damage: Damage | None = None, version: int = 0,
    state: VersionState = VersionState.production,
) -> co.ReplicaEntry:
    """Our inventory entry for one replica. A damaged replica keeps advertising its identity,
    so that the admin sees which version went bad, but its damage makes it no candidate."""
    return co.ReplicaEntry(
        name, mode.code, maintenance, load_balancing, affinity.code, fixed_server, shared,
        identity,
        damaged_at=-1 if damage is None else max(damage.first_offset, 0),
        bad_blocks=0 if damage is None else max(damage.bad_blocks, 1),
        version=version, state=state.code,
    )


def _network(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _subnets(config: Config) -> tuple[Network, ...]:
    if config.subnets:
        return tuple(ipaddress.ip_network(s, strict=False) for s in config.subnets)
    host = parse_address(config.advertise or config.listen)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if address.is_unspecified:
        return ()
    prefix = 24 if address.version == 4 else 64
    return (ipaddress.ip_network(f"{address}/{prefix}", strict=False),)

