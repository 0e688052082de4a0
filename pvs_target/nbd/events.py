"""What the NBD state machine reports: the export it serves, its events, its one error."""

from __future__ import annotations

import dataclasses

from pvs_target.nbd.wire import CommandFlag, CommandKind, NbdError, TransmissionFlag

MAX_BLOCK_SIZE = 32 * 1024 * 1024
"""Longest READ/WRITE/CACHE we accept: 2^25, what the protocol document says every client may
assume a server handles."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExportInfo:
    """The one export a connection serves, as the handshake describes it."""

    name: str
    size: int
    read_only: bool
    preferred_block_size: int = 4096
    """The vDisk's block size: requests aligned to it need no read-modify-write."""
    minimum_block_size: int = 1
    """1 (byte-precise, what the write cache gives) or 512; requests not aligned to it are
    refused with EINVAL."""
    maximum_block_size: int = MAX_BLOCK_SIZE
    multi_conn: bool = False
    """Advertise CAN_MULTI_CONN: only when FLUSH/FUA on one connection covers all of them."""
    description: str = ""
    fast_zero: bool = False
    """WRITE_ZEROES is cheaper than writing zeroes (e.g. an extent map): FAST_ZERO requests are
    served rather than refused at once with ENOTSUP."""

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export size {self.size} is out of range")
        if self.minimum_block_size not in (1, 512):
            raise ValueError("minimum block size must be 1 or 512")
        preferred = self.preferred_block_size
        if preferred < 512 or preferred & (preferred - 1) or preferred > self.maximum_block_size:
            raise ValueError(
                f"preferred block size {preferred} must be a power of 2, at least 512 and at "
                f"most the maximum block size {self.maximum_block_size}"
            )
        if self.maximum_block_size % self.minimum_block_size:
            raise ValueError("maximum block size must be a multiple of the minimum")
        if len(self.name.encode()) > 4096 or "\0" in self.name:
            raise ValueError("export name must be at most 4096 bytes and hold no NUL")
        if len(self.description.encode()) > 4096 or "\0" in self.description:
            raise ValueError("description must be at most 4096 bytes and hold no NUL")


class NbdProtocolError(Exception):
    """The client broke the protocol beyond recovery: the connection must be dropped.

    ``reason`` is a short snake_case word for logs (``bad_magic``, ``write_too_large``...).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclasses.dataclass(frozen=True, slots=True)
class NeedData:
    """No complete event in what has been received so far."""


NEED_DATA = NeedData()


@dataclasses.dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered (the reply is in ``data_to_send``); for logs."""

    option: int
    reply: int
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TransmissionStarted:
    export_name: str
    flags: TransmissionFlag
    structured_replies: bool
    option: int
    """EXPORT_NAME or GO: how the client got here."""


@dataclasses.dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT; the ACK is queued: send it, then close."""


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: answer what is in flight, then close."""


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """A valid request for the backend; answer it with ``reply_read``/``reply_ok``/
    ``reply_error``. ``data`` is the WRITE payload (owned by the receiver), else None."""

    handle: int
    kind: CommandKind
    offset: int
    length: int
    flags: CommandFlag
    data: bytearray | None


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """An invalid request: answer it with ``reply_error(handle, kind, error, message)``."""

    handle: int
    kind: int
    offset: int
    length: int
    error: NbdError
    message: str


Event = (
    NeedData | OptionHandled | TransmissionStarted | Aborted | Disconnect | Command | Refused
)

__all__ = [
    "MAX_BLOCK_SIZE",
    "NEED_DATA",
    "Aborted",
    "Command",
    "Disconnect",
    "Event",
    "ExportInfo",
    "NbdProtocolError",
    "NeedData",
    "OptionHandled",
    "Refused",
    "TransmissionStarted",
]
