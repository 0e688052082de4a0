"""Error codes carried on the wire, and the exception raised on bad input.

Every failure a peer can report has one code here, so that logs on both sides name the same
thing and a target can decide from the code alone whether to retry, fail over or give up.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    MALFORMED = 1
    """A frame could not be decoded; the connection is closed."""
    UNSUPPORTED_VERSION = 2
    UNKNOWN_TYPE = 3
    TOO_LARGE = 4
    """A frame or request is longer than the negotiated limit."""
    BAD_STATE = 5
    """A message arrived that the current phase does not allow (e.g. READ before login)."""
    BAD_NAME = 6
    UNKNOWN_VDISK = 7
    OUT_OF_RANGE = 8
    """Offset plus length lies past the end of the vDisk."""
    READ_ONLY = 9
    IO_ERROR = 10
    STOPPING = 11
    """The server is stopping its stream service: log in elsewhere."""
    NO_IDENTICAL_REPLICA = 12
    """The pinned identity is not available here (or anywhere, for a login server)."""
    IDENTITY_PENDING = 13
    """The server is still computing the replica identity: retry shortly."""
    BUSY = 14
    """A Private Image vDisk already has its one writer."""
    TIMEOUT = 15
    NOT_ALLOWED = 16
    INTERNAL = 17
    CHECKSUM = 18
    """READ_DATA failed its checksum: the data was damaged on the way; the connection ends."""

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later or at another server."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.STOPPING,
        ErrorCode.NO_IDENTICAL_REPLICA,
        ErrorCode.IDENTITY_PENDING,
        ErrorCode.BUSY,
        ErrorCode.TIMEOUT,
        ErrorCode.IO_ERROR,
        ErrorCode.INTERNAL,
        ErrorCode.CHECKSUM,
    }
)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue.

    Carries the code to send in the GOODBYE frame before closing, so the peer learns why.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""
