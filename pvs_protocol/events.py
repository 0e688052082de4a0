"""Protocol events: one small frozen class per message.

The I/O layers on both sides only ever see these; the byte layouts live in ``wire.py``.
``request_id`` ties a reply to its request so that requests may be pipelined.
"""

from __future__ import annotations

import dataclasses
import enum

from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity


class Checksum(enum.IntEnum):
    """How READ_DATA payloads are protected. Negotiated in HELLO."""

    NONE = 0
    CRC32 = 1


class LoginFlag(enum.IntFlag):
    """Bits of LOGIN_OK ``flags``."""

    READ_ONLY = 1
    """The target must not send WRITE (Standard Image: writes go to its local cache)."""
    FAILOVER = 2
    """The target may move to another server holding an identical replica."""


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    version_min: int
    version_max: int
    max_request: int
    checksums: frozenset[Checksum]
    software: str


@dataclasses.dataclass(frozen=True, slots=True)
class HelloReply:
    version: int
    max_request: int
    max_in_flight: int
    checksum: Checksum
    server_name: str


@dataclasses.dataclass(frozen=True, slots=True)
class Login:
    device_id: str
    vdisk: str
    pinned: ReplicaIdentity | None = None
    """The identity the target streamed before; only an identical replica may serve it."""
    redirected: bool = False
    """Set when a login server sent the target here: this server must serve or refuse, never
    redirect again. That is what makes a redirect loop impossible."""
    avoid: str = ""
    """Name of a server the target just lost (crashed or cut off): the login server must not
    send it there, even before the site has noticed that the server is gone."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoginOk:
    session_id: int
    identity: ReplicaIdentity
    block_size: int
    mode: int
    """``pvs_protocol.modes.Mode`` code."""
    flags: LoginFlag
    server_name: str
    server_address: str
    """HOST:PORT at which this server streams, as the target should show it."""
    site: tuple[str, ...] = ()
    """Stream addresses of other servers of the site, where the target may log in again
    when this one goes away (its bootstrap list may name only one server)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Redirect:
    server_name: str
    address: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Read:
    request_id: int
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReadData:
    request_id: int
    data: bytes | bytearray | memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class Write:
    request_id: int
    offset: int
    data: bytes | bytearray | memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class Flush:
    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Digests:
    """Ask for one page of the manifest tree of the replica logged in to; answered by
    READ_DATA carrying the page (``length`` bytes, which the target knows from the tree's
    shape) or ERROR."""

    request_id: int
    level: int
    page: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True)
class Damaged:
    """The target found a block of this server's replica that does not match the manifest.
    No answer: the server checks the block itself and withdraws the replica if it agrees."""

    block: int
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Done:
    """Successful completion of a WRITE or FLUSH."""

    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    """A failed request (``request_id`` > 0) or a refused login (``request_id`` == 0)."""

    request_id: int
    code: ErrorCode
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Relogin:
    """The server is stopping its stream service: log in again elsewhere before the deadline.

    Requests already sent are still answered until the deadline."""

    deadline_ms: int
    reason: str
    site: tuple[str, ...] = ()
    """Where to log in again: the servers of the site that are serving now."""


@dataclasses.dataclass(frozen=True, slots=True)
class SiteUpdate:
    """The servers of the site that serve now changed: a streaming target learns of servers
    started after its login, and stops counting on those that left."""

    site: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Keepalive:
    token: int
    reply: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Goodbye:
    code: int
    """0 for a normal close, else an ``ErrorCode``."""
    message: str


Event = (
    Hello | HelloReply | Login | LoginOk | Redirect | Read | ReadData | Write | Flush | Digests
    | Damaged | Done | Error | Relogin | SiteUpdate | Keepalive | Goodbye
)


class NeedData(enum.Enum):
    """Returned by ``Connection.next_event`` when a whole frame has not arrived yet."""

    NEED_DATA = enum.auto()


NEED_DATA = NeedData.NEED_DATA
