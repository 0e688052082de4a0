"""The protocol state machine for one connection, shared by server and target.

Rules, in one place:
- The target opens with HELLO; the server answers HELLO_REPLY (or GOODBYE). Nothing else may be
  sent before that, and frames longer than ``HANDSHAKE_MAX_PAYLOAD`` are refused.
- Then the target sends LOGIN, one at a time; the server answers LOGIN_OK (streaming begins),
  REDIRECT (the connection ends: log in at the named server) or ERROR (the target may try again).
- While streaming, the target sends READ, WRITE, FLUSH and DIGESTS with request ids unique
  among its outstanding requests, at most ``max_in_flight`` of them, each at most
  ``max_request`` bytes (a DIGESTS at most one page); the server answers each exactly once
  (READ_DATA of exactly the length asked, DONE or ERROR), in any order. DAMAGED is a report
  from the target and is not answered.
- KEEPALIVE may be sent by either side after HELLO; GOODBYE by either side at any time, and it
  ends the connection.
Any breach by the peer raises ``RemoteProtocolError``; any breach by us ``LocalProtocolError``.
The connection never reads a clock: timeouts belong to the I/O layer.

Nothing is allocated for a frame before it is accepted: a header is checked (and, for a block
frame, its request: id, in-flight count, the length a READ_DATA answers) before its payload is
waited for, and a WRITE the server's ``screen`` refuses (a read-only session) is answered at
once and its data dropped unread as it arrives. A peer announcing lengths it never sends costs
a few bytes of header, not a buffer of the announced size.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from pvs_protocol.modes import Mode


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    __hash__ = object.__hash__  # Enum's own hashes the name in Python, twice per frame


class Phase(enum.Enum):
    HELLO = "hello"
    LOGIN = "login"
    STREAMING = "streaming"
    CLOSED = "closed"

    __hash__ = object.__hash__


_ALWAYS = (ev.Keepalive, ev.Goodbye)
_SENDABLE: dict[tuple[Role, Phase], tuple[type, ...]] = {
    (Role.CLIENT, Phase.HELLO): (ev.Hello, ev.Goodbye),
    (Role.CLIENT, Phase.LOGIN): (ev.Login, *_ALWAYS),
    (Role.CLIENT, Phase.STREAMING): (
        ev.Read, ev.Write, ev.Flush, ev.Digests, ev.Damaged, *_ALWAYS,
    ),
    (Role.SERVER, Phase.HELLO): (ev.HelloReply, ev.Goodbye),
    (Role.SERVER, Phase.LOGIN): (ev.LoginOk, ev.Redirect, ev.Error, *_ALWAYS),
    (Role.SERVER, Phase.STREAMING): (
        ev.ReadData, ev.Done, ev.Error, ev.Relogin, ev.SiteUpdate, *_ALWAYS,
    ),
}
_CLIENT_FRAMES = frozenset(t for t in wire.FrameType if t < 0x80)
_BLOCK_FRAMES = frozenset({wire.FrameType.READ_DATA, wire.FrameType.WRITE})
_MODE_CODES = frozenset(mode.code for mode in Mode)
_FRAME_TYPES = {kind.value: kind for kind in wire.FrameType}
DIRECT_MIN = 64 * 1024
"""Block frames at least this long get a data buffer of their own (``receive_buffer``); for
smaller ones a copy out of the shared receive buffer costs less than a system call more."""
_OFFSET = struct.Struct(">Q")
Screen = Callable[[int, int, int], ev.Error | None]
"""``screen(request_id, offset, length)``: an ERROR refusing a WRITE before its data, or None."""
_REQUESTS = (ev.Read, ev.Write, ev.Flush)
_REPLIES = (ev.ReadData, ev.Done, ev.Error)


def negotiate(
    hello: ev.Hello, *, max_request: int, max_in_flight: int, server_name: str,
    checksum: bool = True,
) -> ev.HelloReply:
    """The server's answer to HELLO; raises ProtocolError(UNSUPPORTED_VERSION) if none fits."""
    if not hello.version_min <= wire.VERSION <= hello.version_max:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"target speaks versions {hello.version_min}-{hello.version_max}, "
            f"this server speaks {wire.VERSION}: upgrade the older side",
        )
    if hello.max_request < 512:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "max_request below 512 bytes")
    chosen = ev.Checksum.NONE
    if checksum and ev.Checksum.CRC32 in hello.checksums:
        chosen = ev.Checksum.CRC32
    limit = min(hello.max_request, max_request, wire.MAX_REQUEST_LIMIT)
    return ev.HelloReply(wire.VERSION, limit, max_in_flight, chosen, server_name)


class Connection:
    """Bytes in, events out, for one side of one connection."""

    def __init__(
        self, role: Role, *, allocate: Callable[[int], bytearray] = bytearray,
        screen: Screen | None = None,
    ) -> None:
        """``allocate(size)`` makes the buffers large block data is received into (a pool's
        ``take``: their old contents are overwritten before anyone sees them).

        ``screen(request_id, offset, length)`` (server side) is asked about each WRITE once
        its header and offset have arrived, before any of its data is kept: the ERROR it
        returns refuses the request (``next_event`` returns that ERROR for the I/O layer to
        send, and the data is dropped as it arrives); None admits it. Only the session knows
        why a write cannot be served (a read-only session, a range past the end); without a
        screen every WRITE is received whole.
        """
        self.role = role
        self._peer = _other(role)
        self._allocate = allocate
        self._screen = screen
        self._screened = False
        """The WRITE at the head of the receive buffer was admitted by ``screen``."""
        self._discard = 0
        """Bytes of a refused WRITE's data still to drop as they arrive."""
        self.phase = Phase.HELLO
        self.max_request = 0
        self.max_in_flight = 0
        self.checksum = ev.Checksum.NONE
        self._buffer = bytearray()
        self._block: tuple[wire.FrameType, int, int, bytes] | None = None
        """The frame (kind, flags, id, prefix) whose data is being received into ``_data``."""
        self._data = bytearray()
        self._filled = 0
        self.broken = False
        """The peer broke the protocol: only GOODBYE may still be sent."""
        self._login_redirected = False
        self._hello: ev.Hello | None = None
        self._login_pending = False
        # request id -> length expected back (READ) or -1 (WRITE, FLUSH)
        self._outstanding: dict[int, int] = {}

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    @classmethod
    def handed_over(
        cls, role: Role, *, max_request: int, max_in_flight: int, checksum: ev.Checksum,
        allocate: Callable[[int], bytearray] = bytearray, screen: Screen | None = None,
    ) -> Connection:
        """A connection taken over in the streaming phase, with what its handshake and login
        settled: pvsd hands a logged-in session to a stream worker process (`pvsd.workers`),
        which goes on where the login left off, under the same rules."""
        connection = cls(role, allocate=allocate, screen=screen)
        connection.phase = Phase.STREAMING
        connection.max_request, connection.max_in_flight = max_request, max_in_flight
        connection.checksum = checksum
        return connection

    @property
    def idle(self) -> bool:
        """Nothing received and not yet decoded, no request open: the connection can change
        hands between two frames without anything of it left behind."""
        return (
            not self._buffer and self._block is None and not self._discard
            and not self._outstanding and not self._login_pending
        )

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken or self.phase is Phase.CLOSED:  # nothing will read it
            return
        if self._discard:  # the data of a refused WRITE: never kept
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
        if self._block is not None:  # the block data being gathered comes first
            room = len(self._data) - self._filled
            if room:
                taken = min(room, len(data))
                self._data[self._filled : self._filled + taken] = data[:taken]
                self._filled += taken
                data = data[taken:]
        if data:
            self._buffer += data

    def receive_buffer(self) -> memoryview | None:
        """Where to receive the next bytes straight into, or None (then use ``receive_data``).
        Meaningful once ``next_event`` has returned NEED_DATA.

        While the data of a large READ_DATA or WRITE is arriving, this is the rest of the
        buffer that will become the event's ``data``: an I/O layer that receives into it
        (``recv_into``, ``BufferedProtocol``) never copies block data in user space. Call
        ``received(n)`` after writing ``n`` bytes into it.
        """
        if self._block is None or self._filled == len(self._data):
            return None
        return memoryview(self._data)[self._filled :]

    def received(self, count: int) -> None:
        """``count`` bytes were written into the buffer ``receive_buffer`` returned."""
        if self._block is None or not 0 <= count <= len(self._data) - self._filled:
            raise ValueError(f"received({count}) outside the buffer receive_buffer gave")
        self._filled += count

    def next_event(self) -> ev.Event | ev.NeedData:
        """Decode the next whole frame, or return NEED_DATA.

        The header is checked before its payload is waited for, so a peer announcing a huge
        length is refused at once rather than buffered. After a breach nothing more is
        decoded, and only GOODBYE may be sent.
        """
        if self.phase is Phase.CLOSED or self.broken:
            return ev.NEED_DATA
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.broken = True
            raise

    def _next_event(self) -> ev.Event | ev.NeedData:
        if self._block is not None:
            return self._finish_block()
        if len(self._buffer) < wire.HEADER_SIZE:
            return ev.NEED_DATA
        magic, type_code, flags, length, request_id = wire.HEADER.unpack_from(self._buffer)
        if magic != wire.MAGIC:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"bad frame magic 0x{magic:04x}")
        kind = _FRAME_TYPES.get(type_code)
        if kind is None:
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_TYPE, f"unknown frame type 0x{type_code:02x}"
            )
        if (kind in _CLIENT_FRAMES) != (self.role is Role.SERVER) and kind not in (
            wire.FrameType.KEEPALIVE, wire.FrameType.GOODBYE,
        ):
            raise RemoteProtocolError(
                ErrorCode.BAD_STATE, f"{kind.name} may not be sent to a {self.role.value}"
            )
        limit = self._payload_limit(kind)
        if length > limit:
            raise RemoteProtocolError(
                ErrorCode.TOO_LARGE, f"{kind.name} of {length} bytes exceeds limit {limit}"
            )
        if kind in _BLOCK_FRAMES and self.phase is Phase.STREAMING:
            refusal = self._accept_block(kind, request_id, length)
            if refusal is not None:
                return refusal
        end = wire.HEADER_SIZE + length
        if len(self._buffer) < end:
            if kind in _BLOCK_FRAMES and length >= DIRECT_MIN and self.phase is Phase.STREAMING:
                self._start_block(kind, flags, request_id, length)
            return ev.NEED_DATA
        # Decode straight from the receive buffer: block data is copied once, by the decoder.
        with memoryview(self._buffer) as view, view[wire.HEADER_SIZE : end] as payload:
            event = wire.decode(kind, flags, request_id, payload, self.checksum)
        del self._buffer[:end]
        self._screened = False
        self._check_received(event)
        return event

    def _accept_block(
        self, kind: wire.FrameType, request_id: int, length: int
    ) -> ev.Error | None:
        """Once a block frame's header and prefix (checksum or offset) are in, and before
        anything is allocated for its data: the request rules they already show (raising
        what decoding the frame whole would raise), then the screen's verdict on a WRITE;
        None to receive the data."""
        start = wire.HEADER_SIZE + wire.BLOCK_PREFIX[kind]
        if len(self._buffer) < start or self._screened:
            return None  # only the header is kept meanwhile
        if kind is wire.FrameType.READ_DATA:
            expected = self._outstanding.get(request_id)
            if expected is None:
                raise RemoteProtocolError(
                    ErrorCode.MALFORMED, f"reply to unknown request {request_id}"
                )
            if length - wire.BLOCK_PREFIX[kind] != expected:
                raise RemoteProtocolError(
                    ErrorCode.MALFORMED,
                    f"READ_DATA {request_id} carries {length - wire.BLOCK_PREFIX[kind]} "
                    f"bytes, {expected} were asked",
                )
            return None
        try:
            self._check_request_id(request_id)
        except LocalProtocolError as error:
            raise RemoteProtocolError(error.code, error.message) from None
        if length <= wire.BLOCK_PREFIX[kind] or self._screen is None:
            return None  # no data: MALFORMED once decoded
        (offset,) = _OFFSET.unpack_from(self._buffer, wire.HEADER_SIZE)
        data_length = length - wire.BLOCK_PREFIX[kind]
        refusal = self._screen(request_id, offset, data_length)
        if refusal is None:
            self._screened = True
            return None
        if refusal.request_id != request_id:
            raise ValueError(f"screen answered request {refusal.request_id}, not {request_id}")
        end = wire.HEADER_SIZE + length
        self._discard = max(0, end - len(self._buffer))
        del self._buffer[:end]
        self._outstanding[request_id] = -1  # open: the ERROR returned answers it
        return refusal

    def _start_block(self, kind: wire.FrameType, flags: int, request_id: int, length: int) -> None:
        """Gather a large block frame's data in a buffer of its own, which becomes the event's
        data: it is copied once here at most (the part already received), or never when the
        I/O layer receives into ``receive_buffer``."""
        start = wire.HEADER_SIZE + wire.BLOCK_PREFIX[kind]
        if len(self._buffer) < start:
            return  # wait for the prefix
        prefix = bytes(self._buffer[wire.HEADER_SIZE : start])
        self._data = self._allocate(length - len(prefix))
        have = len(self._buffer) - start
        self._data[:have] = memoryview(self._buffer)[start:]
        self._buffer.clear()
        self._screened = False  # the next frame is screened afresh
        self._filled = have
        self._block = (kind, flags, request_id, prefix)

    def _finish_block(self) -> ev.Event | ev.NeedData:
        assert self._block is not None
        if self._filled < len(self._data):
            return ev.NEED_DATA
        kind, flags, request_id, prefix = self._block
        data, self._data, self._block = self._data, bytearray(), None
        event = wire.decode_block(kind, flags, request_id, prefix, data, self.checksum)
        self._check_received(event)
        return event

    def _payload_limit(self, kind: wire.FrameType) -> int:
        if kind in _BLOCK_FRAMES and self.phase is Phase.STREAMING:
            if kind is wire.FrameType.READ_DATA:  # a digest page may exceed a tiny max_request
                return max(self.max_request, wire.MAX_DIGEST_PAGE) + 4
            return self.max_request + 8
        return wire.HANDSHAKE_MAX_PAYLOAD

    def _check_received(self, event: ev.Event) -> None:
        try:
            self._apply(event, sending=False)
        except LocalProtocolError as error:
            raise RemoteProtocolError(error.code, error.message) from None

    # -- sending ----------------------------------------------------------------------------

    def send(self, event: ev.Event) -> bytes:
        return b"".join(self.send_buffers(event))

    def send_buffers(self, event: ev.Event) -> list[bytes | bytearray | memoryview]:
        """Like ``send`` but leaves block data as its own buffer, for ``writelines``.

        The event is encoded before the state moves on, so one that cannot be encoded (a
        string past the limit, a number out of range) changes nothing.
        """
        try:
            buffers = wire.encode(event, self.checksum)
        except (ValueError, OverflowError, struct.error) as error:
            raise LocalProtocolError(
                ErrorCode.MALFORMED, f"cannot encode {type(event).__name__}: {error}"
            ) from None
        self._apply(event, sending=True)
        return buffers

    # -- the rules --------------------------------------------------------------------------

    def _apply(self, event: ev.Event, *, sending: bool) -> None:
        """Check ``event`` against the rules and move the state on; raise LocalProtocolError."""
        sender = self.role if sending else self._peer
        if self.phase is Phase.CLOSED:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "connection is closed")
        if self.broken and not isinstance(event, ev.Goodbye):
            raise LocalProtocolError(ErrorCode.BAD_STATE, "connection is broken: say GOODBYE")
        allowed = _SENDABLE[(sender, self.phase)]
        if not isinstance(event, allowed):
            raise LocalProtocolError(
                ErrorCode.BAD_STATE,
                f"{type(event).__name__} not allowed from the {sender.value} "
                f"in phase {self.phase.value}",
            )
        match event:  # the requests and replies of streaming first: they are most frames
            case ev.Read() | ev.Write() | ev.Flush() | ev.Digests():
                self._open_request(event)
            case ev.ReadData() | ev.Done():
                self._close_request(event)
            case ev.Goodbye():
                self.phase = Phase.CLOSED
            case ev.Hello():
                if self._hello is not None:
                    raise LocalProtocolError(ErrorCode.BAD_STATE, "HELLO sent twice")
                self._hello = event
            case ev.HelloReply():
                self._accept_hello_reply(event)
            case ev.Login():
                if self._login_pending:
                    raise LocalProtocolError(ErrorCode.BAD_STATE, "LOGIN while one is pending")
                self._login_pending = True
                self._login_redirected = event.redirected
            case ev.LoginOk() | ev.Redirect() | ev.Error() if self.phase is Phase.LOGIN:
                if not self._login_pending:
                    raise LocalProtocolError(ErrorCode.BAD_STATE, "login reply without LOGIN")
                if isinstance(event, ev.Redirect) and self._login_redirected:
                    raise LocalProtocolError(
                        ErrorCode.BAD_STATE, "REDIRECT of a redirected LOGIN (a redirect loop)"
                    )
                if isinstance(event, ev.Error) and event.request_id != 0:
                    raise LocalProtocolError(ErrorCode.MALFORMED, "login ERROR with a request id")
                if isinstance(event, ev.LoginOk) and event.mode not in _MODE_CODES:
                    raise LocalProtocolError(
                        ErrorCode.MALFORMED, f"LOGIN_OK with unknown mode {event.mode}"
                    )
                self._login_pending = False
                if isinstance(event, ev.LoginOk):
                    self.phase = Phase.STREAMING
                    if ev.LoginFlag.READ_ONLY in event.flags:
                        # the target checks every block against the manifest: a CRC would
                        # only cost both sides (docs/protocol.md, Negotiation)
                        self.checksum = ev.Checksum.NONE
                elif isinstance(event, ev.Redirect):
                    self.phase = Phase.CLOSED
            case ev.Error():
                self._close_request(event)

    def _accept_hello_reply(self, reply: ev.HelloReply) -> None:
        hello = self._hello
        if hello is None:
            raise LocalProtocolError(ErrorCode.BAD_STATE, "HELLO_REPLY before HELLO")
        if not hello.version_min <= reply.version <= hello.version_max:
            raise LocalProtocolError(ErrorCode.UNSUPPORTED_VERSION, "version not offered")
        if not 512 <= reply.max_request <= min(hello.max_request, wire.MAX_REQUEST_LIMIT):
            raise LocalProtocolError(ErrorCode.MALFORMED, "max_request outside offered range")
        if reply.max_in_flight < 1:
            raise LocalProtocolError(ErrorCode.MALFORMED, "max_in_flight must be at least 1")
        if reply.checksum is not ev.Checksum.NONE and reply.checksum not in hello.checksums:
            raise LocalProtocolError(ErrorCode.MALFORMED, "checksum kind not offered")
        self.max_request = reply.max_request
        self.max_in_flight = reply.max_in_flight
        self.checksum = reply.checksum
        self.phase = Phase.LOGIN

    def _check_request_id(self, rid: int) -> None:
        if rid == 0 or rid in self._outstanding:
            raise LocalProtocolError(ErrorCode.MALFORMED, f"request id {rid} zero or in use")
        if len(self._outstanding) >= self.max_in_flight:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE, f"more than {self.max_in_flight} requests in flight"
            )

    def _open_request(self, request: ev.Read | ev.Write | ev.Flush | ev.Digests) -> None:
        rid = request.request_id
        self._check_request_id(rid)
        expected = -1
        if isinstance(request, ev.Read):
            if request.length == 0:
                raise LocalProtocolError(ErrorCode.MALFORMED, f"READ {rid} of zero bytes")
            if request.length > self.max_request:
                raise LocalProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"READ {rid} length {request.length} outside 1..{self.max_request}",
                )
            expected = request.length
        elif isinstance(request, ev.Digests):
            if not 0 < request.length <= wire.MAX_DIGEST_PAGE:
                raise LocalProtocolError(
                    ErrorCode.MALFORMED,
                    f"DIGESTS {rid} length {request.length} outside 1..{wire.MAX_DIGEST_PAGE}",
                )
            expected = request.length
        elif isinstance(request, ev.Write):
            if len(request.data) == 0:
                raise LocalProtocolError(ErrorCode.MALFORMED, f"WRITE {rid} of zero bytes")
            if len(request.data) > self.max_request:
                raise LocalProtocolError(
                    ErrorCode.TOO_LARGE, f"WRITE {rid} longer than {self.max_request}"
                )
        self._outstanding[rid] = expected

    def _close_request(self, reply: ev.ReadData | ev.Done | ev.Error) -> None:
        rid = reply.request_id
        if isinstance(reply, ev.Error) and rid == 0:
            return  # a connection-level error report; the GOODBYE that follows ends it
        expected = self._outstanding.get(rid)
        if expected is None:
            raise LocalProtocolError(ErrorCode.MALFORMED, f"reply to unknown request {rid}")
        if isinstance(reply, ev.ReadData) and len(reply.data) != expected:
            raise LocalProtocolError(
                ErrorCode.MALFORMED,
                f"READ_DATA {rid} carries {len(reply.data)} bytes, {expected} were asked",
            )
        if isinstance(reply, ev.Done) and expected != -1:
            raise LocalProtocolError(ErrorCode.MALFORMED, f"DONE for READ {rid}")
        del self._outstanding[rid]


def _other(role: Role) -> Role:
    return Role.SERVER if role is Role.CLIENT else Role.CLIENT


__all__ = ["Connection", "Phase", "ProtocolError", "Role", "Screen", "negotiate"]
