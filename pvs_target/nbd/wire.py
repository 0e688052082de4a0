"""NBD wire values and byte layouts: the one place that knows them.

Values follow the NBD protocol document (NetworkBlockDevice/nbd, doc/proto.md): fixed newstyle
handshake, options, option replies, info types, transmission flags, commands, command flags,
structured reply types and error numbers. Every integer is big-endian on the wire.
"""

from __future__ import annotations

import enum
import errno
import struct

NBDMAGIC = 0x4E42444D41474943
"""ASCII 'NBDMAGIC': the first 8 bytes the server sends."""
IHAVEOPT = 0x49484156454F5054
"""ASCII 'IHAVEOPT': the second 8 bytes of the greeting and the start of every option."""
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, data length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (then 124 zeroes, maybe)
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK = struct.Struct(">IHHQI")  # magic, reply flags, chunk type, handle, payload length
CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")  # CHUNK, then the data's offset
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length (message follows)
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

EXPORT_NAME_PADDING = bytes(124)
"""Sent after NBD_OPT_EXPORT_NAME's reply unless both sides agreed to NO_ZEROES."""
MAX_STRING = 4096
"""Longest string (export name, message) the protocol allows."""


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class CommandKind(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class NbdError(enum.IntEnum):
    """Error numbers allowed on the wire (not the host's errno values, though they agree on
    Linux for these)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_FROM_ERRNO = {
    errno.EPERM: NbdError.EPERM,
    errno.EACCES: NbdError.EPERM,
    errno.EROFS: NbdError.EPERM,
    errno.EIO: NbdError.EIO,
    errno.ENOMEM: NbdError.ENOMEM,
    errno.EINVAL: NbdError.EINVAL,
    errno.ENOSPC: NbdError.ENOSPC,
    errno.EDQUOT: NbdError.ENOSPC,  # the protocol document asks for these two to be ENOSPC
    errno.EFBIG: NbdError.ENOSPC,
    errno.EOVERFLOW: NbdError.EOVERFLOW,
    errno.ENOTSUP: NbdError.ENOTSUP,
    errno.EOPNOTSUPP: NbdError.ENOTSUP,
    errno.ESHUTDOWN: NbdError.ESHUTDOWN,
}


def error_from_errno(number: int) -> NbdError:
    """The NBD error for a host errno value; anything without a counterpart is EIO."""
    return _FROM_ERRNO.get(number, NbdError.EIO)


def option_name(option: int) -> str:
    try:
        return Option(option).name
    except ValueError:
        return f"OPTION_{option}"


def command_name(kind: int) -> str:
    try:
        return CommandKind(kind).name
    except ValueError:
        return f"COMMAND_{kind}"


# -- strings and option data ----------------------------------------------------------------


def decode_name(data: bytes) -> str | None:
    """A protocol string (UTF-8, no NUL, at most 4096 bytes), or None if ``data`` is not one."""
    if len(data) > MAX_STRING or b"\0" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def encode_message(message: str) -> bytes:
    """``message`` as a protocol string, cut to 4096 bytes on a character boundary."""
    data = message.encode()
    if len(data) <= MAX_STRING:
        return data
    return data[:MAX_STRING].decode(errors="ignore").encode()


def parse_info_request(data: bytes) -> tuple[str | None, frozenset[int]] | None:
    """INFO/GO data: (export name, or None if not a valid string; info types asked), or None
    when the data does not hold together.

    C: 32 bits, name length; name; 16 bits, number of requests; 16 bits each, info types."""
    if len(data) < 6:
        return None
    (name_length,) = U32.unpack_from(data, 0)
    if name_length > len(data) - 6:
        return None
    name = decode_name(data[4 : 4 + name_length])
    at = 4 + name_length
    (count,) = U16.unpack_from(data, at)
    if len(data) != at + 2 + 2 * count:
        return None
    return name, frozenset(U16.unpack_from(data, at + 2 + 2 * i)[0] for i in range(count))


# -- transmission replies -------------------------------------------------------------------


def read_reply(
    structured: bool, handle: int, offset: int, data: bytes | bytearray | memoryview
) -> list[bytes | bytearray | memoryview]:
    """Header and payload of a successful READ reply, as separate buffers."""
    if not structured:
        return [SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data]
    if not data:  # OFFSET_DATA must carry at least one byte
        return [CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.NONE, handle, 0)]
    header = CHUNK_OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ChunkType.OFFSET_DATA, handle, len(data) + 8,
        offset,
    )
    return [header, data]


def error_chunk(handle: int, error: NbdError, message: str, offset: int | None) -> bytes:
    """A final ERROR chunk, or ERROR_OFFSET when ``offset`` is given.

    S: 32 bits, error; 16 bits, message length; message; (64 bits, offset)."""
    text = encode_message(message)
    payload = ERROR_PAYLOAD.pack(error, len(text)) + text
    chunk_type = ChunkType.ERROR
    if offset is not None:
        chunk_type = ChunkType.ERROR_OFFSET
        payload += U64.pack(offset)
    header = CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, chunk_type, handle, len(payload))
    return header + payload
