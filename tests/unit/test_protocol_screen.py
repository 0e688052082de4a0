"""Nothing is allocated for a frame before it is accepted (sans-IO, no sockets).

A WRITE the server's ``screen`` refuses is answered as soon as its header and offset are in,
and its data is dropped as it arrives; a block frame whose header and prefix already break the
request rules is refused before a buffer of its announced size exists. Every case is fed
whole, byte by byte, and with the next frame behind it.
"""

from __future__ import annotations

import struct

import pytest
from protocol_helpers import (
    MAX_REQUEST,
    WRITABLE_LOGIN_OK,
    ConnectionPair,
    drain,
    frame,
    normalize,
)

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import DIRECT_MIN, Connection, Role
from pvs_protocol.errors import ErrorCode, RemoteProtocolError

C, S = Role.CLIENT, Role.SERVER


class Recorder:
    """A screen refusing writes at or past ``end``, and an allocator; both record calls."""

    def __init__(self, end: int = 1 << 20) -> None:
        self.end = end
        self.screened: list[tuple[int, int, int]] = []
        self.allocated: list[int] = []

    def screen(self, request_id: int, offset: int, length: int) -> ev.Error | None:
        self.screened.append((request_id, offset, length))
        if offset + length > self.end:
            return ev.Error(request_id, ErrorCode.OUT_OF_RANGE, "past the end")
        return None

    def allocate(self, size: int) -> bytearray:
        self.allocated.append(size)
        return bytearray(size)


def streaming(recorder: Recorder, *, writable: bool = True) -> ConnectionPair:
    pair = ConnectionPair()
    pair.server = Connection(S, screen=recorder.screen, allocate=recorder.allocate)
    pair.client = Connection(C, allocate=recorder.allocate)
    pair.hello()
    pair.login(login_ok=WRITABLE_LOGIN_OK if writable else ev.LoginOk(
        session_id=7, identity=WRITABLE_LOGIN_OK.identity, block_size=4096, mode=1,
        flags=ev.LoginFlag.READ_ONLY, server_name="pvs-a", server_address="10.0.0.1:6910",
    ))
    return pair


def feed(connection: Connection, data: bytes, cut: str) -> list[ev.Event]:
    events: list[ev.Event] = []
    if cut == "whole":
        connection.receive_data(data)
        return drain(connection)
    for index in range(len(data)):
        connection.receive_data(data[index : index + 1])
        events += drain(connection)
    return events


@pytest.mark.parametrize("cut", ["whole", "bytes"])
@pytest.mark.parametrize("size", [100, DIRECT_MIN, MAX_REQUEST])
def test_a_refused_write_is_answered_before_its_data_and_the_data_is_dropped(
    cut: str, size: int
) -> None:
    recorder = Recorder(end=4096)
    pair = streaming(recorder)
    write = pair.client.send(ev.Write(5, 4096, bytes([7]) * size))
    head, data = write[: wire.HEADER_SIZE + 8], write[wire.HEADER_SIZE + 8 :]
    assert feed(pair.server, head[:-1], cut) == []  # no offset yet: nothing decided
    refusal = ev.Error(5, ErrorCode.OUT_OF_RANGE, "past the end")
    assert feed(pair.server, head[-1:], cut) == [refusal]
    assert recorder.screened == [(5, 4096, size)] and recorder.allocated == []
    assert pair.server.outstanding == 1
    pair.client.receive_data(pair.server.send(refusal))  # answered while the data is on its way
    assert pair.client.next_event() == refusal
    following = pair.client.send(ev.Write(5, 0, b"fits"))  # the id is free again
    assert feed(pair.server, data + following, cut) == [ev.Write(5, 0, b"fits")]
    assert recorder.allocated == [] and len(recorder.screened) == 2


def test_an_admitted_write_is_screened_once_and_received_whole() -> None:
    recorder = Recorder()
    pair = streaming(recorder)
    data = bytes(range(256)) * (DIRECT_MIN // 256)
    write = pair.client.send(ev.Write(3, 0, data))
    events = feed(pair.server, write, "bytes")
    assert [normalize(event) for event in events] == [ev.Write(3, 0, data)]
    assert recorder.screened == [(3, 0, len(data))] and recorder.allocated == [len(data)]


def test_a_header_announcing_the_largest_write_costs_nothing_while_refused() -> None:
    """The issue's flood: 24 bytes announcing max_request, then silence."""
    recorder = Recorder(end=0)
    pair = streaming(recorder, writable=False)
    header = frame(wire.FrameType.WRITE, struct.pack(">Q", 0), 9, length=MAX_REQUEST + 8)
    pair.server.receive_data(header)
    assert drain(pair.server) == [ev.Error(9, ErrorCode.OUT_OF_RANGE, "past the end")]
    assert recorder.allocated == []
    assert pair.server.receive_buffer() is None


@pytest.mark.parametrize(
    ("request_id", "outstanding", "message"),
    [(0, False, "zero or in use"), (1, True, "zero or in use")],
)
def test_a_write_breaking_the_id_rules_is_refused_before_a_buffer(
    request_id: int, outstanding: bool, message: str
) -> None:
    recorder = Recorder()
    pair = streaming(recorder)
    if outstanding:
        pair.exchange(C, ev.Read(1, 0, 512))
    announced = frame(wire.FrameType.WRITE, struct.pack(">Q", 0), request_id,
                      length=MAX_REQUEST + 8)
    pair.server.receive_data(announced)
    with pytest.raises(RemoteProtocolError, match=message):
        pair.server.next_event()
    assert recorder.allocated == [] and recorder.screened == []


@pytest.mark.parametrize(
    ("request_id", "length", "message"),
    [(9, 512, "unknown request 9"), (1, MAX_REQUEST, f"carries {MAX_REQUEST} bytes, 512")],
)
def test_read_data_that_answers_nothing_asked_is_refused_before_a_buffer(
    request_id: int, length: int, message: str
) -> None:
    recorder = Recorder()
    pair = streaming(recorder)
    pair.exchange(C, ev.Read(1, 0, 512))
    reply = frame(wire.FrameType.READ_DATA, bytes(4), request_id, length=length + 4)
    pair.client.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match=message) as refused:
        pair.client.next_event()
    assert refused.value.code is ErrorCode.MALFORMED
    assert recorder.allocated == []


def test_without_a_screen_every_write_is_received() -> None:
    pair = ConnectionPair()
    pair.hello()
    pair.login()  # read-only: the session answers READ_ONLY, not the state machine
    assert pair.send(C, ev.Write(1, 0, b"x")) == [ev.Write(1, 0, b"x")]
