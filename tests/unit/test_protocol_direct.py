"""Large block frames received straight into the buffer their event carries.

``Connection.receive_buffer`` hands the I/O layer the rest of a large READ_DATA's (or WRITE's)
data buffer, so a ``recv_into`` puts the bytes where the event will carry them. Fed by
``receive_data`` or by ``receive_buffer``, in any cut, the events must be the same.
"""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import WRITABLE_LOGIN_OK, drain, encode, pair_in

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import DIRECT_MIN, Connection, Phase
from pvs_protocol.errors import ErrorCode, RemoteProtocolError

SIZE = 256 * 1024
DATA = os.urandom(SIZE)
HELLO = ev.Hello(2, 2, SIZE, frozenset({ev.Checksum.CRC32}), "pvs-target/test")


def streaming_client(*lengths: int) -> Connection:
    """A client in STREAMING with one READ in flight per length (ids 1, 2...)."""
    pair = pair_in(Phase.STREAMING, hello=HELLO, max_request=SIZE, login_ok=WRITABLE_LOGIN_OK)
    for request_id, length in enumerate(lengths, start=1):
        pair.client.send(ev.Read(request_id, 0, length))
    return pair.client


def read_data(request_id: int, data: bytes) -> bytes:
    return encode(ev.ReadData(request_id, data), ev.Checksum.CRC32)


def feed_direct(connection: Connection, stream: bytes, cuts: list[int]) -> list[ev.Event]:
    """Feed ``stream`` as an I/O layer with a BufferedProtocol would: into the connection's
    own buffer whenever it offers one, else through ``receive_data`` in pieces of ``cuts``."""
    events: list[ev.Event] = []
    position, turn = 0, 0
    while position < len(stream):
        target = connection.receive_buffer()
        size = max(1, cuts[turn % len(cuts)]) if cuts else len(stream)
        turn += 1
        if target is not None:
            count = min(len(target), size, len(stream) - position)
            target[:count] = stream[position : position + count]
            target.release()
            connection.received(count)
        else:
            count = min(size, len(stream) - position)
            connection.receive_data(stream[position : position + count])
        position += count
        events += drain(connection)
    return events


def test_large_read_data_lands_in_the_buffer_the_event_carries() -> None:
    client = streaming_client(SIZE)
    stream = read_data(1, DATA)
    client.receive_data(stream[: wire.HEADER_SIZE + 4 + 100])
    assert drain(client) == []
    target = client.receive_buffer()
    assert target is not None and len(target) == SIZE - 100
    target[:] = DATA[100:]
    target.release()
    client.received(SIZE - 100)
    assert client.receive_buffer() is None
    (event,) = drain(client)
    assert isinstance(event, ev.ReadData) and event.request_id == 1
    assert isinstance(event.data, bytearray)  # the receiver's buffer itself, not a copy
    assert event.data == DATA
    assert client.outstanding == 0


def test_small_frames_use_the_shared_buffer() -> None:
    client = streaming_client(DIRECT_MIN - 1)
    stream = read_data(1, DATA[: DIRECT_MIN - 1])
    client.receive_data(stream[:-1])
    assert client.receive_buffer() is None
    client.receive_data(stream[-1:])
    (event,) = drain(client)
    assert isinstance(event, ev.ReadData) and event.data == DATA[: DIRECT_MIN - 1]


def test_whole_frame_already_received_is_decoded_without_a_block_buffer() -> None:
    client = streaming_client(SIZE)
    client.receive_data(read_data(1, DATA))
    assert client.receive_buffer() is None
    (event,) = drain(client)
    assert isinstance(event, ev.ReadData) and event.data == DATA


@settings(deadline=None, max_examples=60)
@given(
    lengths=st.lists(st.sampled_from([512, 4096, DIRECT_MIN, SIZE]), min_size=1, max_size=4),
    # tiny cuts split headers and prefixes anywhere; one big cut keeps the case quick
    cuts=st.lists(
        st.one_of(st.integers(1, 24), st.integers(1000, SIZE + 64)), min_size=1, max_size=6
    ).filter(lambda cuts: max(cuts) >= 1000),
)
def test_any_cut_gives_the_same_events(lengths: list[int], cuts: list[int]) -> None:
    stream = b"".join(read_data(i, DATA[:length]) for i, length in enumerate(lengths, start=1))
    stream += encode(ev.Keepalive(9, reply=True))
    direct = feed_direct(streaming_client(*lengths), stream, cuts)
    plain = streaming_client(*lengths)
    plain.receive_data(stream)
    expected = drain(plain)
    assert [type(e) for e in direct] == [type(e) for e in expected]
    for got, want in zip(direct, expected, strict=True):
        if isinstance(got, ev.ReadData):
            assert isinstance(want, ev.ReadData)
            assert (got.request_id, bytes(got.data)) == (want.request_id, bytes(want.data))
        else:
            assert got == want


def test_checksum_is_checked_on_data_received_in_place() -> None:
    client = streaming_client(SIZE)
    damaged = bytearray(read_data(1, DATA))
    damaged[-1] ^= 0x01
    with pytest.raises(RemoteProtocolError) as caught:
        feed_direct(client, bytes(damaged), [4096])
    assert caught.value.code is ErrorCode.CHECKSUM
    assert client.broken
    assert client.receive_buffer() is None or client.next_event() is ev.NEED_DATA


def test_length_not_asked_for_is_refused_after_the_data() -> None:
    client = streaming_client(SIZE)
    other = DATA[: SIZE - 512]
    with pytest.raises(RemoteProtocolError) as caught:
        feed_direct(client, read_data(1, other), [1000])
    assert caught.value.code is ErrorCode.MALFORMED


def test_received_outside_the_offered_buffer_is_a_bug_of_the_caller() -> None:
    client = streaming_client(SIZE)
    with pytest.raises(ValueError):
        client.received(1)  # no block buffer offered yet
    client.receive_data(read_data(1, DATA)[:100])
    assert drain(client) == []  # the header is looked at by next_event
    target = client.receive_buffer()
    assert target is not None
    with pytest.raises(ValueError):
        client.received(len(target) + 1)


def test_large_write_reaches_the_server_in_its_own_buffer() -> None:
    pair = pair_in(Phase.STREAMING, hello=HELLO, max_request=SIZE)
    stream = pair.client.send(ev.Write(5, 4096, DATA))
    events = feed_direct(pair.server, stream, [777, SIZE])
    (event,) = events
    assert isinstance(event, ev.Write)
    assert (event.request_id, event.offset, bytes(event.data)) == (5, 4096, DATA)


def test_crc_of_the_block_is_zlibs() -> None:
    prefix = zlib.crc32(DATA).to_bytes(4, "big")
    event = wire.decode_block(
        wire.FrameType.READ_DATA, 0, 3, prefix, bytearray(DATA), ev.Checksum.CRC32
    )
    assert isinstance(event, ev.ReadData) and event.data == DATA
