"""Test tools for the sans-IO protocol: a client and a server joined by a fake link.

Nothing here opens a socket. ``ConnectionPair.send`` encodes an event on one side, feeds the
bytes to the other side and returns what that side decoded, so a test reads as a conversation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import Connection, Phase, Role, negotiate
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity

IDENTITY = ReplicaIdentity(
    version=3, timestamp_ns=1_700_000_000_123_456_789, size=8 * 1024**3,
    digest=bytes(range(DIGEST_SIZE)),
)
MAX_REQUEST = 64 * 1024
MAX_IN_FLIGHT = 4

HELLO = ev.Hello(2, 2, MAX_REQUEST, frozenset({ev.Checksum.CRC32}), "pvs-target/test")
LOGIN = ev.Login("52:54:00:12:34:56", "win11-lab")
LOGIN_OK = ev.LoginOk(
    session_id=7, identity=IDENTITY, block_size=4096, mode=1, flags=ev.LoginFlag.READ_ONLY,
    server_name="pvs-a", server_address="10.0.0.1:6910",
)
WRITABLE_LOGIN_OK = ev.LoginOk(
    session_id=8, identity=IDENTITY, block_size=4096, mode=2, flags=ev.LoginFlag(0),
    server_name="pvs-a", server_address="10.0.0.1:6910",
)
"""A Private Image session: the one kind whose READ_DATA keeps the CRC agreed in HELLO."""


def normalize(event: ev.Event | ev.NeedData) -> ev.Event | ev.NeedData:
    """Block data as bytes, so an event decoded into a memoryview compares by value."""
    if isinstance(event, ev.ReadData | ev.Write):
        return dataclasses.replace(event, data=bytes(event.data))
    return event


def drain(connection: Connection) -> list[ev.Event]:
    """Every event the connection can decode from what it has been fed so far."""
    events: list[ev.Event] = []
    while True:
        event = connection.next_event()
        if event is ev.NEED_DATA:
            return events
        assert not isinstance(event, ev.NeedData)
        events.append(event)


def frame(
    kind: wire.FrameType | int, payload: bytes = b"", request_id: int = 0, flags: int = 0,
    length: int | None = None,
) -> bytes:
    """Raw frame bytes, bypassing every check, to play a peer that breaks the rules."""
    size = len(payload) if length is None else length
    return wire.HEADER.pack(wire.MAGIC, kind, flags, size, request_id) + payload


def encode(event: ev.Event, checksum: ev.Checksum = ev.Checksum.NONE) -> bytes:
    """Frame bytes for ``event`` without any state machine: what a rule-breaking peer sends."""
    return b"".join(wire.encode(event, checksum))


def split(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """``data`` cut into pieces of the given sizes; the rest as the last piece."""
    position = 0
    for size in sizes:
        yield data[position : position + size]
        position += size
    yield data[position:]


class ConnectionPair:
    def __init__(self) -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)

    def side(self, role: Role) -> Connection:
        return self.client if role is Role.CLIENT else self.server

    def peer(self, role: Role) -> Connection:
        return self.server if role is Role.CLIENT else self.client

    def send(self, role: Role, event: ev.Event) -> list[ev.Event]:
        """Send ``event`` from ``role``; return what the peer decoded (block data as bytes)."""
        data = self.side(role).send(event)
        receiver = self.peer(role)
        receiver.receive_data(data)
        return [normalize(e) for e in drain(receiver)]  # type: ignore[misc]

    def exchange(self, role: Role, event: ev.Event) -> ev.Event:
        """Send ``event`` and check that the peer decoded exactly it."""
        received = self.send(role, event)
        assert received == [normalize(event)]
        return received[0]

    def hello(
        self, hello: ev.Hello = HELLO, *, max_request: int = MAX_REQUEST,
        max_in_flight: int = MAX_IN_FLIGHT, checksum: bool = True,
    ) -> ev.HelloReply:
        received = self.exchange(Role.CLIENT, hello)
        assert isinstance(received, ev.Hello)
        reply = negotiate(
            received, max_request=max_request, max_in_flight=max_in_flight, server_name="pvs-a",
            checksum=checksum,
        )
        self.exchange(Role.SERVER, reply)
        assert self.client.phase is self.server.phase is Phase.LOGIN
        return reply

    def login(self, login: ev.Login = LOGIN, login_ok: ev.LoginOk = LOGIN_OK) -> None:
        self.exchange(Role.CLIENT, login)
        self.exchange(Role.SERVER, login_ok)
        assert self.client.phase is self.server.phase is Phase.STREAMING


def pair_in(
    phase: Phase, *, hello: ev.Hello = HELLO, max_request: int = MAX_REQUEST,
    max_in_flight: int = MAX_IN_FLIGHT, checksum: bool = True, login_ok: ev.LoginOk = LOGIN_OK,
) -> ConnectionPair:
    """A pair that has completed the handshake up to ``phase`` (HELLO, LOGIN or STREAMING).

    ``checksum=False`` plays a server that chooses NONE even when CRC32 is offered.
    """
    pair = ConnectionPair()
    if phase in (Phase.LOGIN, Phase.STREAMING):
        pair.hello(hello, max_request=max_request, max_in_flight=max_in_flight, checksum=checksum)
    if phase is Phase.STREAMING:
        pair.login(login_ok=login_ok)
    return pair
