"""Byte layouts of every frame. The only place that knows them (see docs/protocol.md).

All integers are big-endian. Every frame is a 16-byte header followed by ``length`` bytes of
payload; decoding a payload checks that it is consumed exactly, so trailing garbage is an error
just like a short payload.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from collections.abc import Callable

from pvs_protocol import events as ev
from pvs_protocol.errors import ErrorCode, RemoteProtocolError
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity
from pvs_protocol.modes import Mode

try:  # zlib-ng computes the same CRC-32 about 10x faster than zlib (docs/benchmarks.md)
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - an optional speed-up
    _crc32 = zlib.crc32

MAGIC = 0x5056  # "PV"
VERSION = 2
"""2: manifest identities (56 bytes), DIGESTS, DAMAGED and SITE; version 1 is retired."""
HEADER = struct.Struct(">HBBIQ")  # magic, type, flags, payload length, request id
HEADER_SIZE = HEADER.size  # 16
HANDSHAKE_MAX_PAYLOAD = 4096
"""Limit on every frame that carries no block data; also applies before HELLO completes."""
MAX_STRING = 1024
MAX_REQUEST_LIMIT = 32 * 1024 * 1024
"""No negotiation can raise the request size above this."""
FLAG_REPLY = 0x01
MAX_SITE_ADDRESSES = 16
"""LOGIN_OK names at most this many other servers (enough to find the site again)."""
MAX_DIGEST_PAGE = 4096
"""Largest DIGESTS request: one page of the manifest tree (``manifest.PAGE_SIZE``)."""


class FrameType(enum.IntEnum):
    HELLO = 0x01
    LOGIN = 0x02
    READ = 0x03
    WRITE = 0x04
    FLUSH = 0x05
    DIGESTS = 0x06
    DAMAGED = 0x07
    KEEPALIVE = 0x10
    GOODBYE = 0x11
    HELLO_REPLY = 0x81
    LOGIN_OK = 0x82
    REDIRECT = 0x83
    READ_DATA = 0x84
    DONE = 0x85
    ERROR = 0x86
    RELOGIN = 0x87
    SITE = 0x88


_IDENTITY = struct.Struct(f">IQQI{DIGEST_SIZE}s")
_HELLO = struct.Struct(">HHIB")
_HELLO_REPLY = struct.Struct(">HIIB")
_LOGIN_HEAD = struct.Struct(">B")
_LOGIN_OK_HEAD = struct.Struct(">QIBB")
_READ = struct.Struct(">QI")
_DIGESTS = struct.Struct(">BQI")
_OFFSET = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LOGIN_PINNED = 0x01
_LOGIN_REDIRECTED = 0x02
_LOGIN_AVOID = 0x04


class _Reader:
    """Cursor over one payload; every short read is a MALFORMED protocol error."""

    __slots__ = ("_data", "_kind", "_pos")

    def __init__(self, data: bytes | memoryview, kind: FrameType) -> None:
        self._data = data
        self._pos = 0
        self._kind = kind

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"{self._kind.name}: payload too short")
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))

    def string(self) -> str:
        (size,) = struct.unpack(">H", self.take(2))
        if size > MAX_STRING:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"{self._kind.name}: string too long")
        try:
            return self.take(size).decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"{self._kind.name}: string is not UTF-8"
            ) from None

    def addresses(self) -> tuple[str, ...]:
        count = self.take(1)[0]
        if count > MAX_SITE_ADDRESSES:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"{self._kind.name}: too many addresses")
        return tuple(self.string() for _ in range(count))

    def identity(self) -> ReplicaIdentity:
        version, timestamp_ns, size, block_size, digest = _IDENTITY.unpack(
            self.take(_IDENTITY.size)
        )
        if block_size == 0 or block_size & (block_size - 1):
            raise RemoteProtocolError(
                ErrorCode.MALFORMED, f"{self._kind.name}: block size {block_size}"
            )
        return ReplicaIdentity(version, timestamp_ns, size, digest, block_size)

    def rest(self) -> bytes:
        """The remaining payload, copied once: the frame's buffer is reused after decoding."""
        chunk = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"{self._kind.name}: trailing bytes")


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise ValueError(f"string of {len(raw)} bytes exceeds the {MAX_STRING}-byte limit")
    return struct.pack(">H", len(raw)) + raw


def _addresses(addresses: tuple[str, ...]) -> bytes:
    if len(addresses) > MAX_SITE_ADDRESSES:
        raise ValueError(f"more than {MAX_SITE_ADDRESSES} site addresses")
    return bytes([len(addresses)]) + b"".join(_string(a) for a in addresses)


def _identity(identity: ReplicaIdentity) -> bytes:
    return _IDENTITY.pack(
        identity.version, identity.timestamp_ns, identity.size, identity.block_size,
        identity.digest,
    )


def checksum(kind: ev.Checksum, data: bytes | bytearray | memoryview) -> int:
    return _crc32(data) if kind is ev.Checksum.CRC32 else 0


def header(kind: FrameType, length: int, request_id: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, kind, flags, length, request_id)


# -- encoding -------------------------------------------------------------------------------


def encode(event: ev.Event, checksum_kind: ev.Checksum) -> list[bytes | bytearray | memoryview]:
    """Frame ``event`` as a list of buffers, so block data is never copied into a new bytes."""
    match event:
        case ev.ReadData(request_id, data):
            crc = _U32.pack(checksum(checksum_kind, data))
            return [header(FrameType.READ_DATA, 4 + len(data), request_id) + crc, data]
        case ev.Write(request_id, offset, data):
            return [header(FrameType.WRITE, 8 + len(data), request_id) + _OFFSET.pack(offset), data]
    kind, payload, request_id, flags = _encode_small(event)
    if len(payload) > HANDSHAKE_MAX_PAYLOAD:  # the peer would refuse it (TOO_LARGE)
        raise ValueError(
            f"{kind.name} payload of {len(payload)} bytes exceeds HANDSHAKE_MAX_PAYLOAD "
            f"({HANDSHAKE_MAX_PAYLOAD})"
        )
    return [header(kind, len(payload), request_id, flags) + payload]


def fit_site(event: ev.Event) -> ev.Event:
    """``event`` as a server must send it: a LOGIN_OK, RELOGIN or SITE whose address list
    would not fit in ``HANDSHAKE_MAX_PAYLOAD`` loses its last (most loaded) addresses until
    it does, and addresses that cannot be encoded (over ``MAX_STRING``) are left out; any other
    event is returned as it is. The list is a hint, and a shorter one is still a valid frame."""
    if not isinstance(event, (ev.LoginOk, ev.Relogin, ev.SiteUpdate)):
        return event
    site = tuple(a for a in event.site if _encodable(a))[:MAX_SITE_ADDRESSES]
    try:
        while site and len(_encode_small(dataclasses.replace(event, site=site))[1]) > (
            HANDSHAKE_MAX_PAYLOAD
        ):
            site = site[:-1]
    except ValueError:  # another field cannot be encoded: the connection refuses it
        return event
    return event if site == event.site else dataclasses.replace(event, site=site)


def _encodable(text: str) -> bool:
    try:
        return len(text.encode("utf-8")) <= MAX_STRING
    except UnicodeEncodeError:
        return False


def _encode_small(event: ev.Event) -> tuple[FrameType, bytes, int, int]:
    match event:
        case ev.Hello(vmin, vmax, max_request, checksums, software):
            mask = sum(1 << c for c in checksums)
            return FrameType.HELLO, _HELLO.pack(vmin, vmax, max_request, mask) + _string(
                software
            ), 0, 0
        case ev.HelloReply(version, max_request, max_in_flight, checksum_kind, name):
            body = _HELLO_REPLY.pack(version, max_request, max_in_flight, checksum_kind)
            return FrameType.HELLO_REPLY, body + _string(name), 0, 0
        case ev.Login(device_id, vdisk, pinned, redirected, avoid):
            flags = (
                (_LOGIN_PINNED if pinned else 0)
                | (_LOGIN_REDIRECTED if redirected else 0)
                | (_LOGIN_AVOID if avoid else 0)
            )
            body = _LOGIN_HEAD.pack(flags) + _string(device_id) + _string(vdisk)
            if pinned is not None:
                body += _identity(pinned)
            if avoid:
                body += _string(avoid)
            return FrameType.LOGIN, body, 0, 0
        case ev.LoginOk(session, identity, block_size, mode, flags, name, address, site):
            body = _LOGIN_OK_HEAD.pack(session, block_size, mode, flags)
            body += _identity(identity) + _string(name) + _string(address) + _addresses(site)
            return FrameType.LOGIN_OK, body, 0, 0
        case ev.Redirect(name, address, reason):
            return FrameType.REDIRECT, _string(name) + _string(address) + _string(reason), 0, 0
        case ev.Read(request_id, offset, length):
            return FrameType.READ, _READ.pack(offset, length), request_id, 0
        case ev.Flush(request_id):
            return FrameType.FLUSH, b"", request_id, 0
        case ev.Digests(request_id, level, page, length):
            return FrameType.DIGESTS, _DIGESTS.pack(level, page, length), request_id, 0
        case ev.Damaged(block, message):
            return FrameType.DAMAGED, _U64.pack(block) + _string(message), 0, 0
        case ev.Done(request_id):
            return FrameType.DONE, b"", request_id, 0
        case ev.Error(request_id, code, message):
            return FrameType.ERROR, _U32.pack(code) + _string(message), request_id, 0
        case ev.Relogin(deadline_ms, reason, site):
            body = _U32.pack(deadline_ms) + _string(reason) + _addresses(site)
            return FrameType.RELOGIN, body, 0, 0
        case ev.SiteUpdate(site):
            return FrameType.SITE, _addresses(site), 0, 0
        case ev.Keepalive(token, reply):
            return FrameType.KEEPALIVE, _U64.pack(token), 0, FLAG_REPLY if reply else 0
        case ev.Goodbye(code, message):
            return FrameType.GOODBYE, _U32.pack(code) + _string(message), 0, 0
    raise TypeError(f"not an encodable event: {event!r}")


# -- decoding -------------------------------------------------------------------------------


def decode(
    kind: FrameType, flags: int, request_id: int, payload: bytes | memoryview,
    checksum_kind: ev.Checksum,
) -> ev.Event:
    """Turn one complete frame into an event; raise RemoteProtocolError on any defect."""
    reader = _Reader(payload, kind)
    event = _DECODERS[kind](reader, request_id, flags, checksum_kind)
    reader.end()
    return event


def _hello(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    vmin, vmax, max_request, mask = r.unpack(_HELLO)
    checksums = frozenset(c for c in ev.Checksum if mask & (1 << c))
    return ev.Hello(vmin, vmax, max_request, checksums, r.string())


def _hello_reply(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    version, max_request, max_in_flight, checksum_kind = r.unpack(_HELLO_REPLY)
    try:
        chosen = ev.Checksum(checksum_kind)
    except ValueError:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "unknown checksum kind") from None
    return ev.HelloReply(version, max_request, max_in_flight, chosen, r.string())


def _login(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    (flags,) = r.unpack(_LOGIN_HEAD)
    device_id, vdisk = r.string(), r.string()
    pinned = r.identity() if flags & _LOGIN_PINNED else None
    avoid = r.string() if flags & _LOGIN_AVOID else ""
    return ev.Login(device_id, vdisk, pinned, bool(flags & _LOGIN_REDIRECTED), avoid)


def _login_ok(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    session, block_size, mode, flags = r.unpack(_LOGIN_OK_HEAD)
    try:
        Mode.from_code(mode)
    except ValueError:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"LOGIN_OK: unknown mode {mode}") from None
    identity = r.identity()
    name, address = r.string(), r.string()
    return ev.LoginOk(
        session, identity, block_size, mode, ev.LoginFlag(flags), name, address, r.addresses()
    )


def _redirect(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    return ev.Redirect(r.string(), r.string(), r.string())


def _read(r: _Reader, request_id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    offset, length = r.unpack(_READ)
    return ev.Read(request_id, offset, length)


def _digests(r: _Reader, request_id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    level, page, length = r.unpack(_DIGESTS)
    return ev.Digests(request_id, level, page, length)


def _damaged(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    (block,) = r.unpack(_U64)
    return ev.Damaged(block, r.string())


def _read_data(r: _Reader, request_id: int, flags: int, kind: ev.Checksum) -> ev.Event:
    prefix = r.take(4)
    return decode_block(FrameType.READ_DATA, flags, request_id, prefix, r.rest(), kind)


def _write(r: _Reader, request_id: int, flags: int, kind: ev.Checksum) -> ev.Event:
    prefix = r.take(8)
    return decode_block(FrameType.WRITE, flags, request_id, prefix, r.rest(), kind)


BLOCK_PREFIX = {FrameType.READ_DATA: 4, FrameType.WRITE: 8}
"""Bytes before the block data in a READ_DATA (its CRC-32) or WRITE (its offset) payload."""


def decode_block(
    kind: FrameType, _flags: int, request_id: int, prefix: bytes, data: bytes | bytearray,
    checksum_kind: ev.Checksum,
) -> ev.ReadData | ev.Write:
    """A READ_DATA or WRITE from its fixed prefix and its data, which the event keeps as is:
    a receiver may have put the data straight into its own buffer, and it is not copied."""
    if kind is FrameType.WRITE:
        (offset,) = _OFFSET.unpack(prefix)
        return ev.Write(request_id, offset, data)
    (expected,) = _U32.unpack(prefix)
    if checksum_kind is not ev.Checksum.NONE and checksum(checksum_kind, data) != expected:
        raise RemoteProtocolError(
            ErrorCode.CHECKSUM, f"READ_DATA {request_id}: checksum mismatch, data corrupted"
        )
    return ev.ReadData(request_id, data)


def _error(r: _Reader, request_id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    (code,) = r.unpack(_U32)
    try:
        known = ErrorCode(code)
    except ValueError:
        known = ErrorCode.INTERNAL
    return ev.Error(request_id, known, r.string())


def _relogin(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    (deadline_ms,) = r.unpack(_U32)
    return ev.Relogin(deadline_ms, r.string(), r.addresses())


def _keepalive(r: _Reader, _id: int, flags: int, _c: ev.Checksum) -> ev.Event:
    (token,) = r.unpack(_U64)
    return ev.Keepalive(token, bool(flags & FLAG_REPLY))


def _goodbye(r: _Reader, _id: int, _flags: int, _c: ev.Checksum) -> ev.Event:
    (code,) = r.unpack(_U32)
    return ev.Goodbye(code, r.string())


_DECODERS: dict[FrameType, Callable[[_Reader, int, int, ev.Checksum], ev.Event]] = {
    FrameType.HELLO: _hello,
    FrameType.HELLO_REPLY: _hello_reply,
    FrameType.LOGIN: _login,
    FrameType.LOGIN_OK: _login_ok,
    FrameType.REDIRECT: _redirect,
    FrameType.READ: _read,
    FrameType.READ_DATA: _read_data,
    FrameType.WRITE: _write,
    FrameType.FLUSH: lambda r, request_id, _f, _c: ev.Flush(request_id),
    FrameType.DIGESTS: _digests,
    FrameType.DAMAGED: _damaged,
    FrameType.DONE: lambda r, request_id, _f, _c: ev.Done(request_id),
    FrameType.ERROR: _error,
    FrameType.RELOGIN: _relogin,
    FrameType.SITE: lambda r, _id, _f, _c: ev.SiteUpdate(r.addresses()),
    FrameType.KEEPALIVE: _keepalive,
    FrameType.GOODBYE: _goodbye,
}
