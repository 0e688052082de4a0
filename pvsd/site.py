"""The site: this server's view of its peers, kept fresh over the coordination channel.

Each server sends a HEARTBEAT (state, power, load) to every peer every ``heartbeat_interval``
and its replica INVENTORY on every change and every ``inventory_interval``, over UDP on the
same port number as its stream service. What arrives is authenticated, checked against
replays, and folded into a view; a peer not heard from for ``peer_timeout`` is down. Placement
decisions read ``view()``; they never wait on the network.

One name, one server (`NameClaims`): a second pvsd started with another's ``name`` (a copied
configuration) would otherwise have the peers take its messages for the real server's, then
drop the real one's as replays and show it down. The peers keep the server that was there
first, log ``duplicate_server_name`` with both addresses, and pass each of the two a datagram
of the other; the one started later hears its own name from an older process and stops
(exit code 2), the other logs the clash and goes on.
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
from pvsd.placements import Placements

log = structlog.get_logger("pvsd.site")

HEARTBEAT_COALESCE = 0.05
"""A change of our target count is sent after this long, with whatever else changed by then."""
CLAIM_MEMORY = 3 * co.MAX_CLOCK_SKEW_MS / 1000
"""Seconds a silent process's sequence numbers are remembered: by then every datagram it sent
is stale (refused by its timestamp), so forgetting them lets no replay through."""
QUIET_DROPS = frozenset({"own", "duplicate_name"})
"""Drop reasons logged by their own events, not as suspicious traffic."""


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


# -- one name, one server -------------------------------------------------------------------

Source = tuple[str, int]


@dataclasses.dataclass
class Claim:
    """One process speaking under a name: its start (epoch), where it sends from, and the
    last message taken from it."""

    epoch: int
    source: Source
    seq: int
    first_heard: float
    last_heard: float
    messages: int = 1
    heartbeat: bytes = b""
    """Its latest HEARTBEAT datagram as received (signed by it): what we pass to the other
    process of a duplicate name, so that it hears its own name from elsewhere."""
    stream_address: str = ""

    @property
    def address(self) -> str:
        """Where it is, as an administrator would look for it."""
        source = format_address(*self.source)
        if not self.stream_address or self.stream_address == source:
            return source
        return f"{self.stream_address} (sending from {source})"


@dataclasses.dataclass(frozen=True, slots=True)
class Duplicate:
    """Two live processes under one name: ``kept`` (started first) is the server the site
    goes on hearing, ``refused`` is dropped until it goes away."""

    name: str
    kept: Claim
    refused: Claim


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one authenticated datagram: take it (``reason`` empty) or drop it for
    ``reason``; ``duplicate`` is set when this datagram showed a duplicate name."""

    reason: str = ""
    detail: str = ""
    duplicate: Duplicate | None = None

    @property
    def accepted(self) -> bool:
        return not self.reason


@dataclasses.dataclass
class _Name:
    incumbent: Claim
    challengers: dict[int, Claim] = dataclasses.field(default_factory=dict)
    """Other epochs heard under the name while the incumbent speaks: held out."""
    refused: set[int] = dataclasses.field(default_factory=set)
    """Challengers found to be a second live server (not a restart elsewhere)."""
    retired: dict[int, float] = dataclasses.field(default_factory=dict)
    """Epochs that went away (a restart replaced them, or they fell silent), and when: any
    datagram of theirs is a replay until it would be stale anyway."""


class NameClaims:
    """Which process speaks for each peer name, and replay protection per process.

    A replay guard keyed by name alone (``co.ReplayGuard``) takes a larger epoch for a restart
    and refuses everything older from then on: with two live processes under one name, the
    real server's datagrams become "replayed" and it is shown down. Here each epoch has its
    own sequence, and a new epoch replaces the one we hear (the incumbent) only when it is a
    restart: it sends from the same address, or the incumbent has gone silent for ``window``
    (the peer timeout). Otherwise it is held out; once the incumbent is heard again after it
    (both alive), it is a duplicate: the older epoch is kept, the newer refused while it lasts.
    Pure: time is given (``now`` monotonic seconds, ``now_ms`` wall-clock milliseconds).
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._names: dict[str, _Name] = {}

    def check(
        self, name: str, envelope: co.Envelope, source: Source, now: float, now_ms: int,
        datagram: bytes = b"",
    ) -> Verdict:
        if abs(envelope.timestamp_ms - now_ms) > co.MAX_CLOCK_SKEW_MS:
            return Verdict(
                "stale", f"{name}: timestamp {envelope.timestamp_ms - now_ms} ms from ours; "
                "check the clocks (NTP) of the site's servers",
            )
        epoch, seq = envelope.epoch, envelope.seq
        state = self._names.get(name)
        if state is None:
            claim = Claim(epoch, source, seq, now, now)
            self._names[name] = _Name(claim)
            _heard(claim, envelope, source, now, datagram, first=True)
            return Verdict()
        incumbent = state.incumbent
        if epoch == incumbent.epoch:
            if seq <= incumbent.seq:
                return _replayed(name, envelope)
            _heard(incumbent, envelope, source, now, datagram)
            duplicate = self._confirm(name, state)
            if state.incumbent is not incumbent:  # the other one started first: kept
                return Verdict("duplicate_name", f"{name}: {incumbent.address} started after "
                               f"{state.incumbent.address}", duplicate)
            return Verdict(duplicate=duplicate)
        if epoch in state.retired:
            return _replayed(name, envelope)
        challenger = state.challengers.get(epoch)
        if challenger is not None:
            if seq <= challenger.seq:
                return _replayed(name, envelope)
            _heard(challenger, envelope, source, now, datagram)
        alive = now - incumbent.last_heard <= self.window
        if challenger is None and source == incumbent.source:
            if epoch < incumbent.epoch and alive:  # an older process there: late, or replayed
                return _replayed(name, envelope)
            # Restarted in place (two processes cannot send from one address), or after a
            # silence with its clock set back: the new process is the server now.
            alive = False
        if not alive:  # a restart (or a move): the new process is the server now
            state.retired[incumbent.epoch] = now
            state.challengers.pop(epoch, None)
            state.refused.discard(epoch)
            if challenger is None:
                challenger = Claim(epoch, source, seq, now, now)
                _heard(challenger, envelope, source, now, datagram, first=True)
            state.incumbent = challenger
            return Verdict()
        if challenger is None:
            challenger = state.challengers[epoch] = Claim(epoch, source, seq, now, now)
            _heard(challenger, envelope, source, now, datagram, first=True)
        duplicate = self._confirm(name, state)
        if state.incumbent is challenger:  # it started first: kept
            return Verdict(duplicate=duplicate)
        return Verdict(
            "duplicate_name", f"{name}: another process (epoch {epoch}) at "
            f"{challenger.address} than the one we hear at {state.incumbent.address}",
            duplicate,
        )

    def _confirm(self, name: str, state: _Name) -> Duplicate | None:
        """A challenger heard twice, with the incumbent heard after its first message, is a
        second live server: keep the older epoch (swap if the challenger is older)."""
        for epoch, challenger in list(state.challengers.items()):
            if epoch in state.refused or challenger.messages < 2:
                continue
            if state.incumbent.last_heard <= challenger.first_heard:
                continue
            incumbent = state.incumbent
            if challenger.epoch < incumbent.epoch:
                del state.challengers[epoch]
                state.challengers[incumbent.epoch] = incumbent
                state.incumbent, challenger = challenger, incumbent
            state.refused.add(challenger.epoch)
            return Duplicate(name, state.incumbent, challenger)
        return None

    def duplicates(self) -> list[Duplicate]:
        """Every duplicate name that still speaks twice."""
        return [
            Duplicate(name, state.incumbent, state.challengers[epoch])
            for name, state in self._names.items()
            for epoch in sorted(state.refused) if epoch in state.challengers
        ]

    def prune(self, now: float) -> list[Duplicate]:
        """Forget what fell silent; return the duplicates that ended (the refused process
        went away)."""
        ended: list[Duplicate] = []
        for name, state in list(self._names.items()):
            for epoch, challenger in list(state.challengers.items()):
                if now - challenger.last_heard > self.window:
                    del state.challengers[epoch]
                    state.retired[epoch] = now
                    if epoch in state.refused:
                        state.refused.discard(epoch)
                        ended.append(Duplicate(name, state.incumbent, challenger))
            for epoch, since in list(state.retired.items()):
                if now - since > CLAIM_MEMORY:
                    del state.retired[epoch]
            if not state.challengers and not state.retired and (
                now - state.incumbent.last_heard > CLAIM_MEMORY
            ):
                del self._names[name]
        return ended


def _heard(
    claim: Claim, envelope: co.Envelope, source: Source, now: float, datagram: bytes,
    *, first: bool = False,
) -> None:
    claim.seq, claim.last_heard, claim.source = envelope.seq, now, source
    if not first:
        claim.messages += 1
    if isinstance(envelope.message, co.Heartbeat):
        claim.heartbeat = datagram
        claim.stream_address = envelope.message.stream_address


def _replayed(name: str, envelope: co.Envelope) -> Verdict:
    return Verdict(
        "replayed", f"{name}: message {(envelope.epoch, envelope.seq)} seen before"
    )


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
        self.claims = NameClaims(config.peer_timeout)
        self.conflict: str | None = None
        """Set when another server that started first uses our name: we must not go on."""
        self.on_name_conflict: list[Callable[[str], None]] = []
        """Called once, with the other server's address, when `conflict` is set."""
        self._clashes: set[int] = set()
        """Epochs of later servers under our name already logged."""
        self._epoch = time.time_ns()
        self._seq = 0
        self._generation = 0
        self._inventory_sent: dict[tuple[str, int], co.ReplicaEntry] | None = None
        self._inventory_due = 0.0
        self._last_chunks: list[co.InventoryChunk] = []
        self._placed = Placements(ttl=2 * config.heartbeat_interval + 1.0)
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
        source = (str(addr[0]), int(addr[1]))
        now = time.monotonic()
        try:
            envelope = co.decode(data, self.config.site_key)
            sender = envelope.message.name
            if sender == self.config.name:
                self._own_name(envelope, source)
                raise co.CoordinationError("own", "a message with our own name")
            verdict = self.claims.check(
                sender, envelope, source, now, time.time_ns() // 1_000_000, data
            )
            if verdict.duplicate is not None:
                self._duplicate_found(verdict.duplicate)
            if not verdict.accepted:
                raise co.CoordinationError(verdict.reason, verdict.detail)
        except co.CoordinationError as error:
            count = self.dropped[error.reason] = self.dropped[error.reason] + 1
            # 1st, 2nd, 4th, 8th...: a bad peer cannot flood the log
            if count & (count - 1) == 0 and error.reason not in QUIET_DROPS:
                log.warning(
                    "site_message_dropped", source=format_address(*source), reason=error.reason,
                    error=str(error), dropped=count,
                    hint="a server with another site key or version, or forged traffic",
                )
            return
        self.received += 1
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
                peer = self.peers[sender] = Peer(
                    sender, source, message, now, epoch=envelope.epoch
                )
                log.info("peer_joined", peer=sender, address=message.stream_address)
            peer.heartbeat, peer.last_heard, peer.source = message, now, source
            if not peer.up:
                peer.up = True
                log.info("peer_up", peer=sender, address=message.stream_address)
            self._placed.heard(sender, message.targets)
            if back and message.state is co.ServerState.SERVING:
                for up_callback in self.on_peer_up:
                    up_callback(sender)
        elif peer is not None:
            peer.last_heard = now
            self._add_chunk(peer, message)

    # -- duplicate names --------------------------------------------------------------------

    def _own_name(self, envelope: co.Envelope, source: Source) -> None:
        """A datagram with our name, signed with the site key: our own come back (we are in
        our peer list), one of a process of ours that ran before, or another live server
        using our name. Only the last, stamped after we started, is a clash; the one that
        started later stops."""
        if envelope.epoch == self._epoch:
            return
        now_ms = time.time_ns() // 1_000_000
        if abs(envelope.timestamp_ms - now_ms) > co.MAX_CLOCK_SKEW_MS:
            return
        if envelope.timestamp_ms * 1_000_000 <= self._epoch:
            return  # sent before we started: not a live server (or a replay of an old one)
        message = envelope.message
        address = message.stream_address if isinstance(message, co.Heartbeat) else ""
        other = address or format_address(*source)
        name = self.config.name
        if envelope.epoch < self._epoch:  # it was there first
            if self.conflict is not None:
                return
            self.conflict = other
            log.error(
                "duplicate_server_name", name=name, other=other, heard_from=format_address(*source),
                action=f"another server of the site already runs as {name!r} at {other}: this "
                f"one stops; give it a name of its own (name = \"...\" in its configuration, or "
                "--name) and start it again",
            )
            for callback in self.on_name_conflict:
                callback(other)
        elif envelope.epoch not in self._clashes:
            self._clashes.add(envelope.epoch)
            log.error(
                "duplicate_server_name", name=name, other=other, heard_from=format_address(*source),
                action=f"a server started after this one at {other} uses this server's name "
                f"{name!r}: it stops by itself once it hears of this one; if it does not, stop "
                "it and give it a name of its own",
            )

    def _duplicate_found(self, duplicate: Duplicate) -> None:
        kept, refused = duplicate.kept, duplicate.refused
        log.error(
            "duplicate_server_name", name=duplicate.name, kept=kept.address,
            refused=refused.address, dropped_messages_from=refused.address,
            action=f"two servers use the name {duplicate.name!r}: the one at {kept.address} "
            f"(started first) stays {duplicate.name}; give the one at {refused.address} a name "
            "of its own (name = \"...\" in its configuration) and restart it",
        )
        self._relay(duplicate)

    def _relay(self, duplicate: Duplicate) -> None:
        """Pass each process of a duplicate name a datagram of the other, signed by it: the
        later one hears its own name from an older process and stops, the kept one logs the
        clash. Only when the kept one is the older: a relay must never stop the kept one."""
        kept, refused = duplicate.kept, duplicate.refused
        if self._transport is None or kept.epoch > refused.epoch:
            return
        if kept.heartbeat:
            self._send(kept.heartbeat, refused.source)
        if refused.heartbeat:
            self._send(refused.heartbeat, kept.source)

    def forget(self, name: str) -> bool:
        """Remove a peer that is down from the view (it left for good, or was renamed);
        False if we do not know it. It comes back if it speaks again. Refuse (ValueError)
        while it is up: its next heartbeat would bring it back at once."""
        peer = self.peers.get(name)
        if peer is None:
            return False
        if peer.up:
            raise ValueError(f"{name} is up")
        del self.peers[name]
        self._placed.forget(name)
        log.info("peer_forgotten", peer=name, address=peer.heartbeat.stream_address)
        return True

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
        for duplicate in self.claims.duplicates():  # until the later one has stopped
            self._relay(duplicate)
        for ended in self.claims.prune(now):
            log.info(
                "duplicate_server_gone", name=ended.name, gone=ended.refused.address,
                kept=ended.kept.address,
            )
        for peer in self.peers.values():
            if peer.up and now - peer.last_heard > self.config.peer_timeout:
                peer.up = False
                self._placed.forget(peer.name)
                log.warning(
                    "peer_down", peer=peer.name, silent_for=round(now - peer.last_heard, 1),
                    hint="no logins go to it until it speaks again",
                )
                for callback in self.on_peer_down:
                    callback(peer.name)

    # -- the view ---------------------------------------------------------------------------

    def note_placement(self, server: str) -> None:
        """Count a redirect we just made until that server's heartbeats include it, so that
        a burst of logins is spread rather than sent to one stale 'least busy' (placements)."""
        self._placed.placed(server, time.monotonic())

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
        now = time.monotonic()
        for peer in self.peers.values():
            beat = peer.heartbeat
            servers.append(
                ServerView(
                    name=peer.name, address=beat.stream_address,
                    serving=peer.up and beat.state is co.ServerState.SERVING, power=beat.power,
                    targets=beat.targets + self._placed.pending(peer.name, now),
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

