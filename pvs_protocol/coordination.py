"""Site coordination messages between pvsd peers, without I/O.

Each datagram is authenticated with HMAC-SHA256 under the site key and numbered, so a
receiver can drop anything forged, altered or replayed. Servers send a small HEARTBEAT often
(state and load) and their vDisk INVENTORY (replica identities) in chunks that each fit one
unfragmented UDP datagram, on change and periodically so a lost chunk heals by itself.
See docs/protocol.md, "Coordination channel".
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import struct
from typing import Any

from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity
from pvs_protocol.modes import Mode, SubnetAffinity, VersionState

MAGIC = b"PVSC"
VERSION = 3
"""2: identities carry the manifest block size; entries may say a replica is damaged.
3: one entry per version of a vDisk, with the version's number and state."""
MAC_SIZE = 32
MAX_DATAGRAM = 1400
"""Below a typical Ethernet MTU: a datagram is never fragmented on the way."""
MAX_CLOCK_SKEW_MS = 30_000
"""Messages stamped further from our clock are refused (guards against replays after a
receiver restarts and has forgotten the sequence numbers it saw)."""

_ENVELOPE = struct.Struct(">4sBBQQQ")  # magic, version, type, epoch, seq, timestamp ms
_HEARTBEAT = struct.Struct(">BIIQIHH")
_INVENTORY = struct.Struct(">IHH")
_ENTRY = struct.Struct(">BBBIB")  # mode, affinity, flags, version, state
_IDENTITY = struct.Struct(f">IQQI{DIGEST_SIZE}s")
_DAMAGE = struct.Struct(">QI")
_MODE_CODES = frozenset(m.code for m in Mode)
_AFFINITY_CODES = frozenset(a.code for a in SubnetAffinity)
_STATE_CODES = frozenset(s.code for s in VersionState)


class CoordinationError(Exception):
    """A datagram was dropped; ``reason`` is a short label counted in the admin API."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class MessageType(enum.IntEnum):
    HEARTBEAT = 1
    INVENTORY = 2


class ServerState(enum.IntEnum):
    SERVING = 1
    STOPPING = 2
    STOPPED = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    name: str
    stream_address: str
    admin_address: str
    state: ServerState
    power: float
    targets: int
    bytes_per_second: int
    inventory_generation: int
    inventory_chunks: int
    subnets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaEntry:
    vdisk: str
    mode: int
    maintenance: bool
    load_balancing: bool
    affinity: int
    fixed_server: str
    shared: bool
    identity: ReplicaIdentity | None
    """The manifest's identity; None while it is being loaded or the replica is checked."""
    damaged_at: int = -1
    """Offset of the first block found not to match the manifest, or -1: a damaged replica
    is never a candidate, whatever its identity says."""
    bad_blocks: int = 0
    """Blocks known not to match (a lower bound until a full check has run)."""
    version: int = 0
    """Which version of the vDisk this copy is (known before its identity is)."""
    state: int = VersionState.production.code
    """The version's `VersionState` code, as this server's properties say."""

    @property
    def damaged(self) -> bool:
        return self.damaged_at >= 0

    @property
    def key(self) -> tuple[str, int]:
        return self.vdisk, self.version


@dataclasses.dataclass(frozen=True, slots=True)
class InventoryChunk:
    name: str
    generation: int
    index: int
    count: int
    entries: tuple[ReplicaEntry, ...]


Message = Heartbeat | InventoryChunk


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    epoch: int
    """Set once per process start, so sequence numbers may begin again after a restart."""
    seq: int
    timestamp_ms: int
    message: Message


# -- strings --------------------------------------------------------------------------------


def _str(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"string {text[:20]!r}... longer than 255 bytes")
    return bytes([len(raw)]) + raw


class _Cursor:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise CoordinationError("malformed", "datagram too short")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def string(self) -> str:
        size = self.take(1)[0]
        try:
            return self.take(size).decode("utf-8")
        except UnicodeDecodeError:
            raise CoordinationError("malformed", "string is not UTF-8") from None


# -- encoding -------------------------------------------------------------------------------


def encode(envelope: Envelope, key: bytes) -> bytes:
    message = envelope.message
    if isinstance(message, Heartbeat):
        kind, body = MessageType.HEARTBEAT, _encode_heartbeat(message)
    else:
        kind, body = MessageType.INVENTORY, _encode_inventory(message)
    head = _ENVELOPE.pack(
        MAGIC, VERSION, kind, envelope.epoch, envelope.seq, envelope.timestamp_ms
    )
    signed = head + body
    datagram = signed + hmac.digest(key, signed, hashlib.sha256)
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"coordination datagram of {len(datagram)} bytes exceeds {MAX_DATAGRAM}")
    return datagram


def _encode_heartbeat(beat: Heartbeat) -> bytes:
    body = _HEARTBEAT.pack(
        beat.state, round(beat.power * 1000), beat.targets, beat.bytes_per_second,
        beat.inventory_generation, beat.inventory_chunks, len(beat.subnets),
    )
    body += _str(beat.name) + _str(beat.stream_address) + _str(beat.admin_address)
    return body + b"".join(_str(subnet) for subnet in beat.subnets)


def _encode_entry(entry: ReplicaEntry) -> bytes:
    flags = (
        (1 if entry.maintenance else 0)
        | (2 if entry.load_balancing else 0)
        | (4 if entry.shared else 0)
        | (8 if entry.identity is not None else 0)
        | (16 if entry.damaged else 0)
    )
    out = _ENTRY.pack(entry.mode, entry.affinity, flags, entry.version, entry.state)
    out += _str(entry.vdisk)
    out += _str(entry.fixed_server)
    if entry.identity is not None:
        i = entry.identity
        out += _IDENTITY.pack(i.version, i.timestamp_ns, i.size, i.block_size, i.digest)
    if entry.damaged:
        out += _DAMAGE.pack(entry.damaged_at, min(entry.bad_blocks, 0xFFFFFFFF))
    return out


def _encode_inventory(chunk: InventoryChunk) -> bytes:
    body = _INVENTORY.pack(chunk.generation, chunk.index, chunk.count) + _str(chunk.name)
    return body + bytes([len(chunk.entries)]) + b"".join(_encode_entry(e) for e in chunk.entries)


_BUDGET = MAX_DATAGRAM - _ENVELOPE.size - MAC_SIZE - _INVENTORY.size - 256 - 1


def chunk_inventory(
    name: str, generation: int, entries: list[ReplicaEntry]
) -> list[InventoryChunk]:
    """Split a server's replica list into chunks that each fit one datagram."""
    groups: list[list[ReplicaEntry]] = [[]]
    used = 0
    for entry in entries:
        size = len(_encode_entry(entry))
        if groups[-1] and (used + size > _BUDGET or len(groups[-1]) == 255):
            groups.append([])
            used = 0
        groups[-1].append(entry)
        used += size
    return [
        InventoryChunk(name, generation, index, len(groups), tuple(group))
        for index, group in enumerate(groups)
    ]


# -- decoding -------------------------------------------------------------------------------


def decode(datagram: bytes, key: bytes) -> Envelope:
    """Verify and decode one datagram; raise CoordinationError (never anything else)."""
    if len(datagram) < _ENVELOPE.size + MAC_SIZE:
        raise CoordinationError("malformed", f"datagram of {len(datagram)} bytes is too short")
    signed, mac = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.digest(key, signed, hashlib.sha256)):
        raise CoordinationError("unauthenticated", "bad MAC: wrong site key or altered")
    cursor = _Cursor(signed)
    magic, version, kind, epoch, seq, timestamp_ms = cursor.unpack(_ENVELOPE)
    if magic != MAGIC:
        raise CoordinationError("malformed", "bad magic")
    if version != VERSION:
        raise CoordinationError("version", f"coordination version {version}, we speak {VERSION}")
    try:
        message: Message
        if kind == MessageType.HEARTBEAT:
            message = _decode_heartbeat(cursor)
        elif kind == MessageType.INVENTORY:
            message = _decode_inventory(cursor)
        else:
            raise CoordinationError("malformed", f"unknown message type {kind}")
    except ValueError as error:
        raise CoordinationError("malformed", str(error)) from None
    if cursor.pos != len(signed):
        raise CoordinationError("malformed", "trailing bytes")
    return Envelope(epoch, seq, timestamp_ms, message)


def _decode_heartbeat(c: _Cursor) -> Heartbeat:
    state, power, targets, bps, generation, chunks, subnet_count = c.unpack(_HEARTBEAT)
    name, stream, admin = c.string(), c.string(), c.string()
    subnets = tuple(c.string() for _ in range(subnet_count))
    return Heartbeat(
        name, stream, admin, ServerState(state), power / 1000, targets, bps, generation, chunks,
        subnets,
    )


def _decode_inventory(c: _Cursor) -> InventoryChunk:
    generation, index, count = c.unpack(_INVENTORY)
    name = c.string()
    if not index < count:
        raise CoordinationError("malformed", f"chunk {index} of {count}")
    entries = []
    for _ in range(c.take(1)[0]):
        mode, affinity, flags, version, state = c.unpack(_ENTRY)
        if mode not in _MODE_CODES or affinity not in _AFFINITY_CODES:
            raise CoordinationError("malformed", f"unknown mode {mode} or affinity {affinity}")
        if state not in _STATE_CODES:
            raise CoordinationError("malformed", f"unknown version state {state}")
        vdisk, fixed = c.string(), c.string()
        identity = None
        if flags & 8:
            version, ts, size, block_size, digest = c.unpack(_IDENTITY)
            identity = ReplicaIdentity(version, ts, size, digest, block_size)
        damaged_at, bad_blocks = c.unpack(_DAMAGE) if flags & 16 else (-1, 0)
        entries.append(
            ReplicaEntry(
                vdisk, mode, bool(flags & 1), bool(flags & 2), affinity, fixed, bool(flags & 4),
                identity, damaged_at, bad_blocks, version, state,
            )
        )
    return InventoryChunk(name, generation, index, count, tuple(entries))


# -- replay protection ----------------------------------------------------------------------


class ReplayGuard:
    """Accepts each sender's messages only once and in order, and only if fresh.

    Keyed by the sender's name: (epoch, seq) must grow strictly. A restarted sender picks a
    larger epoch (its start time), so it is heard again at once.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def check(self, sender: str, envelope: Envelope, now_ms: int) -> None:
        if abs(envelope.timestamp_ms - now_ms) > MAX_CLOCK_SKEW_MS:
            raise CoordinationError(
                "stale", f"{sender}: timestamp {envelope.timestamp_ms - now_ms} ms from ours; "
                "check the clocks (NTP) of the site's servers",
            )
        position = (envelope.epoch, envelope.seq)
        last = self._last.get(sender)
        if last is not None and position <= last:
            raise CoordinationError("replayed", f"{sender}: message {position} seen before")
        self._last[sender] = position


def sender_of(message: Message) -> str:
    return message.name
