"""The NBD server side as a state machine: bytes in, events out, reply bytes on request.

No sockets, no asyncio, no clock. The adapter (``server.py``) feeds what it receives to
``receive_data``, takes events from ``next_event`` until ``NEED_DATA``, sends whatever
``data_to_send`` holds (the greeting and option replies, which need nothing but this object),
and asks ``reply_read``/``reply_ok``/``reply_error`` for the bytes of each transmission reply.

Rules kept here (NBD protocol document, fixed newstyle, no TLS):
- Handshake: greeting with FIXED_NEWSTYLE|NO_ZEROES; client flags other than those two end the
  connection. Options EXPORT_NAME, GO, INFO, LIST, ABORT and STRUCTURED_REPLY are served; any
  other option gets ERR_UNSUP and the next option is parsed as usual.
- Transmission: every request is validated here first; a bad one becomes ``Refused`` with the
  error to send (EINVAL for unknown commands or flags, misalignment, lengths past the maximum
  block size and reads past the end; ENOSPC for writes past the end; EPERM for writes to a
  read-only export), a good one becomes ``Command``. A WRITE's payload is always consumed, even
  when the WRITE is refused, so the stream stays in step; a refused payload is skipped without
  being kept, and one longer than ``DISCARD_LIMIT`` ends the connection instead.
- Anything that makes the stream impossible to follow (a bad magic, unknown client flags, an
  unknown export for EXPORT_NAME, which cannot be refused) raises ``NbdProtocolError``; the
  connection is then broken and must be closed.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable

from pvs_target.nbd import wire
from pvs_target.nbd.events import (
    NEED_DATA,
    Aborted,
    Command,
    Disconnect,
    Event,
    ExportInfo,
    NbdProtocolError,
    OptionHandled,
    Refused,
    TransmissionStarted,
)
from pvs_target.nbd.wire import (
    CommandFlag,
    CommandKind,
    NbdError,
    Option,
    Reply,
    TransmissionFlag,
)

Buffer = bytes | bytearray | memoryview

MAX_OPTION_DATA = 16 * 1024
"""Longest option payload we keep; a longer one is skipped unread and refused with TOO_BIG."""
MAX_OPTIONS = 1024
"""Options per connection before we take the client for a denial of service and hang up."""
DISCARD_LIMIT = 64 * 1024 * 1024
"""Longest refused WRITE payload we read and throw away; past it we hang up (logged by the
adapter) rather than spend a link's time on it. Valid WRITEs are at most the maximum block
size (32 MiB), so no honest client gets here."""

_KINDS = {kind.value: kind for kind in CommandKind}
"""``CommandKind(n)`` by lookup: the enum call costs more than the rest of parsing a request."""
_FAST_ZERO = int(CommandFlag.FAST_ZERO)
_PAYLOAD_KINDS = frozenset({CommandKind.WRITE})
_SIZED_KINDS = frozenset({CommandKind.READ, CommandKind.WRITE, CommandKind.CACHE})
"""Kinds whose length the maximum block size bounds (TRIM and WRITE_ZEROES carry no data)."""
_WRITING_KINDS = frozenset({CommandKind.WRITE, CommandKind.TRIM, CommandKind.WRITE_ZEROES})
_GROWING_KINDS = frozenset({CommandKind.WRITE, CommandKind.WRITE_ZEROES})
"""Past the end, these get ENOSPC (as a full disk would answer); everything else EINVAL."""
_REQUEST_SIZE = wire.REQUEST.size
_unpack_request = wire.REQUEST.unpack_from
_ERROR_OFFSET_KINDS = frozenset(
    {CommandKind.READ, CommandKind.WRITE, CommandKind.TRIM, CommandKind.CACHE,
     CommandKind.WRITE_ZEROES}
)


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    """Greeting sent; waiting for the client flags."""
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    """After ABORT or DISC: nothing more is read."""
    BROKEN = "broken"
    """After a protocol error: the connection must be dropped."""


class _Read(enum.Enum):
    CLIENT_FLAGS = 1
    OPTION = 2
    REQUEST = 3
    PAYLOAD = 4
    DISCARD = 5
    NOTHING = 6


class NbdServerConnection:
    """One client's connection, server side."""

    def __init__(self, export: ExportInfo) -> None:
        self.export = export
        self.phase = Phase.HANDSHAKE
        self.structured_replies = False
        self.no_zeroes = False
        self.transmission_flags = TransmissionFlag(0)
        self.shutting_down = False
        self._read = _Read.CLIENT_FLAGS
        self._buffer = bytearray()
        self._position = 0
        self._outgoing: list[bytes] = [
            wire.GREETING.pack(
                wire.NBDMAGIC,
                wire.IHAVEOPT,
                wire.HandshakeFlag.FIXED_NEWSTYLE | wire.HandshakeFlag.NO_ZEROES,
            )
        ]
        self._options = 0
        self._allowed_flags: dict[int, int] = {}
        self._payload = bytearray()
        self._filled = 0
        self._pending: Command | None = None
        self._discard = 0
        self._after_discard: Callable[[], Event | None] | None = None
        self._error: NbdProtocolError | None = None

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Take bytes from the client (copied: ``data`` may be reused by the caller)."""
        if self._error is not None:
            raise self._error
        if self._read is _Read.NOTHING or not data:
            return
        if self._position == len(self._buffer):
            # Nothing older is waiting: payload bytes go straight to their destination.
            if self._read is _Read.PAYLOAD:
                count = min(len(data), len(self._payload) - self._filled)
                self._payload[self._filled : self._filled + count] = data[:count]
                self._filled += count
                data = data[count:]
            elif self._read is _Read.DISCARD:
                count = min(len(data), self._discard)
                self._discard -= count
                data = data[count:]
            if not data:
                return
        self._buffer += data

    def next_event(self) -> Event:
        """The next event, or ``NEED_DATA`` until more bytes arrive."""
        if self._error is not None:
            raise self._error
        try:
            while True:
                event = self._step()
                if event is not None:
                    return event
        except NbdProtocolError as error:
            self._error = error
            self.phase = Phase.BROKEN
            self._read = _Read.NOTHING
            self._buffer.clear()
            self._position = 0
            raise

    def data_to_send(self) -> bytes:
        """Bytes the protocol itself has to send (greeting, option replies); then cleared."""
        if not self._outgoing:
            return b""
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def shutdown(self) -> None:
        """The server is stopping: refuse further options with ERR_SHUTDOWN and further
        requests with ESHUTDOWN (requests already taken are still answered by the adapter)."""
        self.shutting_down = True

    # -- the reading loop -------------------------------------------------------------------

    def _step(self) -> Event | None:
        """Consume one unit of input; an event, None to go on, or NEED_DATA."""
        read = self._read
        if read is _Read.REQUEST:
            start = self._position
            end = start + _REQUEST_SIZE
            if end > len(self._buffer):
                return self._need(start)
            self._position = end
            return self._request(*_unpack_request(self._buffer, start))
        if read is _Read.PAYLOAD:
            return self._fill_payload()
        if read is _Read.DISCARD:
            return self._skip()
        if read is _Read.OPTION:
            return self._option()
        if read is _Read.CLIENT_FLAGS:
            return self._client_flags()
        return NEED_DATA

    def _take(self, count: int) -> bytes | None:
        """``count`` bytes from the buffer, or None (the buffer compacted) if not there yet."""
        start = self._position
        end = start + count
        if end > len(self._buffer):
            if start:
                del self._buffer[:start]
                self._position = 0
            return None
        self._position = end
        return bytes(self._buffer[start:end])

    def _client_flags(self) -> Event | None:
        data = self._take(wire.CLIENT_FLAGS.size)
        if data is None:
            return NEED_DATA
        (flags,) = wire.CLIENT_FLAGS.unpack(data)
        known = int(wire.ClientFlag.FIXED_NEWSTYLE | wire.ClientFlag.NO_ZEROES)
        if flags & ~known:  # (~ of an IntFlag would keep only its own bits)
            raise NbdProtocolError("bad_client_flags", f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & wire.ClientFlag.NO_ZEROES)
        self.phase = Phase.OPTIONS
        self._read = _Read.OPTION
        return None

    # -- options ----------------------------------------------------------------------------

    def _option(self) -> Event | None:
        start = self._position
        header_end = start + wire.OPTION_HEADER.size
        if header_end > len(self._buffer):
            return self._need(start)
        magic, option, length = wire.OPTION_HEADER.unpack_from(self._buffer, start)
        if magic != wire.IHAVEOPT:
            raise NbdProtocolError("bad_magic", f"option magic {magic:#x} is not IHAVEOPT")
        self._options += 1
        if self._options > MAX_OPTIONS:
            raise NbdProtocolError("too_many_options", f"more than {MAX_OPTIONS} options")
        if length > MAX_OPTION_DATA:
            if option == Option.EXPORT_NAME:  # cannot be answered with an error
                raise NbdProtocolError("option_too_large", f"export name of {length} bytes")
            self._position = header_end
            self._discard_then(length, lambda: self._option_too_big(option, length))
            return None
        if header_end + length > len(self._buffer):
            return self._need(start)
        self._position = header_end + length
        data = bytes(self._buffer[header_end : self._position])
        return self._handle_option(option, data)

    def _need(self, start: int) -> Event:
        if start:
            del self._buffer[:start]
            self._position = 0
        return NEED_DATA

    def _option_too_big(self, option: int, length: int) -> Event:
        known = option in Option._value2member_map_
        reply = Reply.ERR_TOO_BIG if known else Reply.ERR_UNSUP
        return self._reply_option(option, reply, f"option data of {length} bytes")

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if self.shutting_down and option != Option.ABORT:
            return self._reply_option(option, Reply.ERR_SHUTDOWN, "the server is shutting down")
        if option == Option.EXPORT_NAME:
            return self._export_name(data)
        if option == Option.ABORT:
            self._queue_option_reply(option, Reply.ACK)
            self._close()
            return Aborted()
        if option == Option.LIST:
            if data:
                return self._reply_option(option, Reply.ERR_INVALID, "LIST takes no data")
            name = self.export.name.encode()
            entry = wire.U32.pack(len(name)) + name + self.export.description.encode()
            self._queue_option_reply(option, Reply.SERVER, entry)
            return self._reply_option(option, Reply.ACK)
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data)
        if option == Option.STRUCTURED_REPLY:
            if data:
                return self._reply_option(option, Reply.ERR_INVALID, "takes no data")
            self.structured_replies = True
            return self._reply_option(option, Reply.ACK)
        return self._reply_option(option, Reply.ERR_UNSUP, "not supported by this server")

    def _export_name(self, data: bytes) -> Event:
        name = wire.decode_name(data)
        if name is None or not self._is_our_export(name):
            raise NbdProtocolError(
                "unknown_export", f"EXPORT_NAME {data[:64]!r}: no such export (cannot refuse)"
            )
        flags = self._enter_transmission()
        reply = wire.EXPORT_NAME_REPLY.pack(self.export.size, flags)
        self._outgoing.append(reply if self.no_zeroes else reply + wire.EXPORT_NAME_PADDING)
        return TransmissionStarted(name, flags, self.structured_replies, Option.EXPORT_NAME)

    def _info_or_go(self, option: int, data: bytes) -> Event:
        parsed = wire.parse_info_request(data)
        if parsed is None:
            return self._reply_option(option, Reply.ERR_INVALID, "malformed request")
        name, requests = parsed
        if name is None or not self._is_our_export(name):
            return self._reply_option(
                option, Reply.ERR_UNKNOWN, f"no such export; this server has {self.export.name!r}"
            )
        export = self.export
        flags = self._transmission_flags()
        self._queue_info(option, wire.INFO_EXPORT.pack(wire.Info.EXPORT, export.size, flags))
        self._queue_info(
            option,
            wire.INFO_BLOCK_SIZE.pack(
                wire.Info.BLOCK_SIZE,
                export.minimum_block_size,
                export.preferred_block_size,
                export.maximum_block_size,
            ),
        )
        if wire.Info.NAME in requests:
            self._queue_info(option, wire.U16.pack(wire.Info.NAME) + export.name.encode())
        if wire.Info.DESCRIPTION in requests and export.description:
            description = export.description.encode()
            self._queue_info(option, wire.U16.pack(wire.Info.DESCRIPTION) + description)
        if option == Option.INFO:
            return self._reply_option(option, Reply.ACK)
        self._queue_option_reply(option, Reply.ACK)
        flags = self._enter_transmission()
        return TransmissionStarted(name, flags, self.structured_replies, Option.GO)

    def _is_our_export(self, name: str) -> bool:
        return name in ("", self.export.name)  # "" is the default export: ours

    def _queue_info(self, option: int, payload: bytes) -> None:
        self._queue_option_reply(option, Reply.INFO, payload)

    def _queue_option_reply(self, option: int, reply: Reply, payload: bytes = b"") -> None:
        header = wire.OPTION_REPLY.pack(wire.OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._outgoing.append(header + payload)

    def _reply_option(self, option: int, reply: Reply, message: str = "") -> Event:
        self._queue_option_reply(option, reply, wire.encode_message(message))
        return OptionHandled(option, reply, message)

    def _transmission_flags(self) -> TransmissionFlag:
        export = self.export
        flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
        flags |= TransmissionFlag.SEND_CACHE
        if export.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_FUA
                | TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        if export.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.structured_replies:
            flags |= TransmissionFlag.SEND_DF  # a READ is always answered with one chunk
        return flags

    def _enter_transmission(self) -> TransmissionFlag:
        flags = self._transmission_flags()
        self.transmission_flags = flags
        # Plain ints: ~ of an IntFlag keeps only the flag's own bits, hiding unknown ones.
        fua = int(CommandFlag.FUA) if flags & TransmissionFlag.SEND_FUA else 0
        allowed = {int(kind): fua for kind in CommandKind}
        if flags & TransmissionFlag.SEND_DF:
            allowed[CommandKind.READ] |= int(CommandFlag.DF)
        if flags & TransmissionFlag.SEND_WRITE_ZEROES:
            allowed[CommandKind.WRITE_ZEROES] |= int(CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO)
        self._allowed_flags = allowed
        self.phase = Phase.TRANSMISSION
        self._read = _Read.REQUEST
        return flags

    # -- transmission -----------------------------------------------------------------------

    def _request(
        self, magic: int, flags: int, kind: int, handle: int, offset: int, length: int
    ) -> Event | None:
        if magic != wire.REQUEST_MAGIC:
            raise NbdProtocolError("bad_magic", f"request magic {magic:#x}")
        if kind == CommandKind.DISC:
            self._close()
            return Disconnect()
        refusal = self._check(kind, flags, offset, length)
        if kind in _PAYLOAD_KINDS:
            if refusal is not None:
                if length > DISCARD_LIMIT:
                    raise NbdProtocolError(
                        "write_too_large",
                        f"WRITE of {length} bytes, past the {DISCARD_LIMIT}-byte limit",
                    )
                event = Refused(handle, kind, offset, length, refusal[0], refusal[1])
                self._discard_then(length, lambda: event)
                return None
            payload = bytearray(length)
            command = Command(
                handle, CommandKind.WRITE, offset, length, _command_flags(flags), payload
            )
            if not length:
                return command
            self._pending = command
            self._payload = payload
            self._filled = 0
            self._read = _Read.PAYLOAD
            return None
        if refusal is not None:
            return Refused(handle, kind, offset, length, refusal[0], refusal[1])
        return Command(handle, _KINDS[kind], offset, length, _command_flags(flags), None)

    def _check(
        self, kind: int, flags: int, offset: int, length: int
    ) -> tuple[NbdError, str] | None:
        """Why a request must be refused, or None when the backend should see it."""
        export = self.export
        allowed = self._allowed_flags.get(kind)
        if allowed is None or kind == CommandKind.BLOCK_STATUS:
            return NbdError.EINVAL, f"{wire.command_name(kind)} is not supported"
        if self.shutting_down:
            return NbdError.ESHUTDOWN, "the server is shutting down"
        if export.read_only and kind in _WRITING_KINDS:
            return NbdError.EPERM, "the export is read-only"
        if flags & ~allowed:
            return NbdError.EINVAL, f"flags {flags:#x} are not valid for {wire.command_name(kind)}"
        if kind == CommandKind.FLUSH:
            if offset or length:
                return NbdError.EINVAL, "FLUSH must have offset and length 0"
            return None
        if kind in _SIZED_KINDS and length > export.maximum_block_size:
            return NbdError.EINVAL, (
                f"length {length} is past the maximum block size {export.maximum_block_size}"
            )
        if offset + length > export.size:
            error = NbdError.ENOSPC if kind in _GROWING_KINDS else NbdError.EINVAL
            return error, f"{offset}+{length} is past the end of the export ({export.size})"
        minimum = export.minimum_block_size
        if minimum > 1 and (offset % minimum or length % minimum):
            return NbdError.EINVAL, f"{offset}+{length} is not aligned to {minimum} bytes"
        if flags & _FAST_ZERO and not export.fast_zero:
            return NbdError.ENOTSUP, "zeroing is not faster than writing here"
        return None

    def _fill_payload(self) -> Event | None:
        wanted = len(self._payload) - self._filled
        available = len(self._buffer) - self._position
        if available:
            count = min(wanted, available)
            start = self._position
            with memoryview(self._buffer) as view:
                self._payload[self._filled : self._filled + count] = view[start : start + count]
            self._position += count
            self._filled += count
            wanted -= count
        if wanted:
            return self._need(self._position)
        command = self._pending
        assert command is not None
        self._pending = None
        self._payload = bytearray()
        self._read = _Read.REQUEST
        return command

    def _discard_then(self, count: int, then: Callable[[], Event | None]) -> None:
        self._discard = count
        self._after_discard = then
        self._read = _Read.DISCARD

    def _skip(self) -> Event | None:
        available = len(self._buffer) - self._position
        count = min(available, self._discard)
        self._position += count
        self._discard -= count
        if self._discard:
            return self._need(self._position)
        then = self._after_discard
        assert then is not None
        self._after_discard = None
        self._read = _Read.OPTION if self.phase is Phase.OPTIONS else _Read.REQUEST
        return then()

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._read = _Read.NOTHING
        self._buffer.clear()
        self._position = 0

    # -- replies (bytes from wire.py; only the negotiated reply style is decided here) ------

    def reply_read(self, handle: int, offset: int, data: Buffer) -> list[Buffer]:
        """The reply to a successful READ of ``len(data)`` bytes at ``offset``: header and
        payload as separate buffers, for ``writelines`` (nothing is copied). With structured
        replies: one OFFSET_DATA chunk flagged DONE (NONE for an empty read)."""
        return wire.read_reply(self.structured_replies, handle, offset, data)

    def reply_ok(self, handle: int) -> bytes:
        """The reply to a successful request other than READ (a simple reply is always
        allowed for these)."""
        return wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(
        self, handle: int, kind: int, error: NbdError, message: str = "",
        offset: int | None = None,
    ) -> bytes:
        """The reply for a failed request: with structured replies an ERROR chunk carrying
        ``message`` (ERROR_OFFSET with ``offset`` where the command allows it), else a simple
        reply with the error number."""
        if not self.structured_replies:
            return wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, error, handle)
        with_offset = offset if kind in _ERROR_OFFSET_KINDS else None
        return wire.error_chunk(handle, error, message, with_offset)


@functools.cache
def _command_flags(value: int) -> CommandFlag:
    """``CommandFlag(value)``, remembered: few combinations occur, and the call is slow."""
    return CommandFlag(value)


__all__ = ["DISCARD_LIMIT", "MAX_OPTIONS", "MAX_OPTION_DATA", "NbdServerConnection", "Phase"]
