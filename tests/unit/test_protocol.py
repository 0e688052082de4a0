"""The sans-IO protocol, without sockets: a client and a server Connection joined by a fake link.

Every frame is checked three ways (fed whole, byte by byte, and followed by the start of the
next frame); every rule of ``connection.py`` is checked from both ends: breaking it on send is
a LocalProtocolError, receiving it as raw bytes from a peer that broke it a RemoteProtocolError.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
import zlib

import pytest
from protocol_helpers import (
    HELLO,
    IDENTITY,
    LOGIN,
    LOGIN_OK,
    MAX_REQUEST,
    WRITABLE_LOGIN_OK,
    ConnectionPair,
    drain,
    encode,
    frame,
    normalize,
    pair_in,
)

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import Connection, Phase, Role, negotiate
from pvs_protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from pvs_protocol.modes import Mode
from pvs_protocol.wire import FrameType

C, S = Role.CLIENT, Role.SERVER

# -- every event, as a short conversation from a pair in a given phase ----------------------

Step = tuple[Role, ev.Event]
SCENARIOS: dict[str, tuple[Phase, list[Step]]] = {
    "hello": (Phase.HELLO, [(C, HELLO)]),
    "hello-reply-crc32": (
        Phase.HELLO,
        [(C, HELLO), (S, ev.HelloReply(2, MAX_REQUEST, 4, ev.Checksum.CRC32, "pvs-a"))],
    ),
    "hello-reply-no-checksum": (
        Phase.HELLO,
        [
            (C, ev.Hello(1, 3, 1024 * 1024, frozenset(), "pvs-target/0.1")),
            (S, ev.HelloReply(2, 512, 1, ev.Checksum.NONE, "")),
        ],
    ),
    "login": (Phase.LOGIN, [(C, LOGIN)]),
    "login-pinned-redirected": (
        Phase.LOGIN, [(C, ev.Login("host-ü", "disque-été ✓", IDENTITY, redirected=True))]
    ),
    "login-ok": (Phase.LOGIN, [(C, LOGIN), (S, LOGIN_OK)]),
    "login-ok-failover": (
        Phase.LOGIN,
        [
            (C, LOGIN),
            (S, ev.LoginOk(2**64 - 1, IDENTITY, 512, 2, ev.LoginFlag.FAILOVER, "b", "[::1]:1")),
        ],
    ),
    "redirect": (
        Phase.LOGIN,
        [(C, LOGIN), (S, ev.Redirect("pvs-b", "10.0.0.2:6910", "pvs-a holds no replica"))],
    ),
    "login-refused": (
        Phase.LOGIN,
        [(C, LOGIN), (S, ev.Error(0, ErrorCode.UNKNOWN_VDISK, "no vDisk named win11-lab"))],
    ),
    "keepalive-in-login": (Phase.LOGIN, [(C, ev.Keepalive(1)), (S, ev.Keepalive(1, True))]),
    "read": (
        Phase.STREAMING,
        [(C, ev.Read(1, 4096, 512)), (S, ev.ReadData(1, bytes(range(256)) * 2))],
    ),
    "read-refused": (
        Phase.STREAMING,
        [(C, ev.Read(2**64 - 1, 2**64 - 512, 512)),
         (S, ev.Error(2**64 - 1, ErrorCode.OUT_OF_RANGE, "past the end of the vDisk"))],
    ),
    "write": (Phase.STREAMING, [(C, ev.Write(3, 0, b"\x00\xff" * 50)), (S, ev.Done(3))]),
    "flush": (Phase.STREAMING, [(C, ev.Flush(4)), (S, ev.Done(4))]),
    "digests": (
        Phase.STREAMING, [(C, ev.Digests(5, 2, 2**64 - 1, 4096)), (S, ev.ReadData(5, b"d" * 4096))]
    ),
    "digests-refused": (
        Phase.STREAMING,
        [(C, ev.Digests(6, 0, 7, 32)), (S, ev.Error(6, ErrorCode.OUT_OF_RANGE, "no page 7"))],
    ),
    "damaged": (Phase.STREAMING, [(C, ev.Damaged(2**64 - 1, "block 9 does not match"))]),
    "relogin": (Phase.STREAMING, [(S, ev.Relogin(5000, "pvs-a is stopping"))]),
    "site": (Phase.STREAMING, [(S, ev.SiteUpdate(("10.0.0.2:6910", "[fd00::5]:6910")))]),
    "connection-error": (Phase.STREAMING, [(S, ev.Error(0, ErrorCode.INTERNAL, "bug"))]),
    "keepalive-from-server": (
        Phase.STREAMING, [(S, ev.Keepalive(2**64 - 1)), (C, ev.Keepalive(2**64 - 1, True))]
    ),
    "goodbye-from-client": (Phase.HELLO, [(C, ev.Goodbye(0, "shutting down"))]),
    "goodbye-from-server": (
        Phase.STREAMING, [(S, ev.Goodbye(ErrorCode.TIMEOUT, "no frame for 60 s"))]
    ),
}


def test_scenarios_cover_every_event_type() -> None:
    covered = {type(event) for _, steps in SCENARIOS.values() for _, event in steps}
    assert covered == set(typing.get_args(ev.Event))


def _feed_whole(receiver: Connection, data: bytes) -> list[ev.Event]:
    receiver.receive_data(data)
    return drain(receiver)


def _feed_byte_by_byte(receiver: Connection, data: bytes) -> list[ev.Event]:
    events: list[ev.Event] = []
    for position in range(len(data)):
        receiver.receive_data(data[position : position + 1])
        decoded = drain(receiver)
        if position < len(data) - 1:
            assert decoded == [], f"event decoded after {position + 1} of {len(data)} bytes"
        events += decoded
    return events


def _check_with_trailing(receiver: Connection, data: bytes, event: ev.Event) -> None:
    """Feed the frame plus all but the last byte of another; only the first may decode."""
    following = encode(ev.Keepalive(0x0102030405060708))
    receiver.receive_data(data + following[:-1])
    assert [normalize(e) for e in drain(receiver)] == [normalize(event)]
    assert receiver.next_event() is ev.NEED_DATA
    if receiver.phase in (Phase.LOGIN, Phase.STREAMING):  # where a KEEPALIVE may follow
        receiver.receive_data(following[-1:])
        assert receiver.next_event() == ev.Keepalive(0x0102030405060708)
        assert receiver.next_event() is ev.NEED_DATA


@pytest.mark.parametrize("feed", ["whole", "byte_by_byte", "with_trailing"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_frame_round_trips(name: str, feed: str) -> None:
    phase, steps = SCENARIOS[name]
    pair = pair_in(phase)
    for role, event in steps:
        data = pair.side(role).send(event)
        receiver = pair.peer(role)
        if feed == "with_trailing":
            _check_with_trailing(copy.deepcopy(receiver), data, event)
        reader = _feed_byte_by_byte if feed == "byte_by_byte" else _feed_whole
        assert [normalize(e) for e in reader(receiver, data)] == [normalize(event)]
    assert pair.client.phase is pair.server.phase


def test_several_frames_in_one_chunk() -> None:
    pair = pair_in(Phase.STREAMING)
    requests: list[ev.Event] = [
        ev.Read(1, 0, 16), ev.Flush(2), ev.Keepalive(5), ev.Write(3, 512, b"abc"),
    ]
    data = b"".join(pair.client.send(request) for request in requests)
    pair.server.receive_data(data)
    assert [normalize(e) for e in drain(pair.server)] == [normalize(r) for r in requests]


def test_send_buffers_keeps_block_data_as_its_own_buffer() -> None:
    pair = pair_in(Phase.STREAMING)
    block = memoryview(bytearray(b"x" * 4096))
    pair.exchange(C, ev.Read(1, 0, 4096))
    buffers = pair.server.send_buffers(ev.ReadData(1, block))
    assert buffers[-1] is block
    pair.client.receive_data(b"".join(buffers))
    received = pair.client.next_event()
    assert isinstance(received, ev.ReadData)
    assert bytes(received.data) == bytes(block)


# -- byte layouts pinned to docs/protocol.md ------------------------------------------------


def test_header_layout() -> None:
    assert wire.HEADER_SIZE == 16
    assert frame(FrameType.READ, b"", request_id=7, flags=1, length=12).hex() == (
        "5056" "03" "01" "0000000c" "0000000000000007"
    )


@pytest.mark.parametrize(
    ("event", "checksum", "expected"),
    [
        (ev.Read(7, 4096, 512), ev.Checksum.NONE,
         "5056 03 00 0000000c 0000000000000007 0000000000001000 00000200"),
        (ev.ReadData(9, b"123456789"), ev.Checksum.CRC32,
         "5056 84 00 0000000d 0000000000000009 cbf43926 313233343536373839"),
        (ev.ReadData(9, b"123456789"), ev.Checksum.NONE,
         "5056 84 00 0000000d 0000000000000009 00000000 313233343536373839"),
        (ev.Write(2, 1, b"\xaa"), ev.Checksum.CRC32,
         "5056 04 00 00000009 0000000000000002 0000000000000001 aa"),
        (ev.Keepalive(1, reply=True), ev.Checksum.NONE,
         "5056 10 01 00000008 0000000000000000 0000000000000001"),
        (ev.Goodbye(ErrorCode.TOO_LARGE, "x"), ev.Checksum.NONE,
         "5056 11 00 00000007 0000000000000000 00000004 0001 78"),
        (ev.Hello(1, 2, 65536, frozenset({ev.Checksum.CRC32}), "t"), ev.Checksum.NONE,
         "5056 01 00 0000000c 0000000000000000 0001 0002 00010000 02 0001 74"),
        (ev.HelloReply(1, 65536, 64, ev.Checksum.CRC32, ""), ev.Checksum.NONE,
         "5056 81 00 0000000d 0000000000000000 0001 00010000 00000040 01 0000"),
        (ev.Relogin(5000, ""), ev.Checksum.NONE,
         "5056 87 00 00000007 0000000000000000 00001388 0000 00"),
    ],
)
def test_encoding(event: ev.Event, checksum: ev.Checksum, expected: str) -> None:
    assert encode(event, checksum).hex() == expected.replace(" ", "")


def test_crc32_is_the_ieee_crc_of_zlib() -> None:
    assert wire.checksum(ev.Checksum.CRC32, b"123456789") == 0xCBF43926 == zlib.crc32(b"123456789")
    assert wire.checksum(ev.Checksum.NONE, b"123456789") == 0


def test_login_layout_with_pinned_identity() -> None:
    data = encode(ev.Login("d", "v", IDENTITY, redirected=True))
    payload = data[wire.HEADER_SIZE :]
    identity = payload[1 + 3 + 3 :]
    assert payload[:7] == b"\x03\x00\x01d\x00\x01v"
    assert len(identity) == 4 + 8 + 8 + 4 + 32
    assert identity == (
        IDENTITY.version.to_bytes(4, "big") + IDENTITY.timestamp_ns.to_bytes(8, "big")
        + IDENTITY.size.to_bytes(8, "big") + IDENTITY.block_size.to_bytes(4, "big")
        + IDENTITY.digest
    )


def test_login_ok_layout() -> None:
    ok = ev.LoginOk(1, IDENTITY, 4096, 1, ev.LoginFlag.READ_ONLY | ev.LoginFlag.FAILOVER, "", "")
    payload = encode(ok)[wire.HEADER_SIZE :]
    assert payload[:14] == bytes.fromhex("0000000000000001 00001000 01 03".replace(" ", ""))
    assert len(payload) == 14 + 56 + 2 + 2 + 1  # no site addresses: a zero count


def test_login_ok_site_addresses_round_trip_and_limit() -> None:
    site = tuple(f"10.0.0.{n}:6910" for n in range(wire.MAX_SITE_ADDRESSES))
    ok = ev.LoginOk(1, IDENTITY, 4096, 1, ev.LoginFlag(0), "s1", "10.0.0.1:6910", site)
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    assert pair.exchange(S, ok) == ok
    too_many = dataclasses.replace(ok, site=(*site, "10.0.0.99:6910"))
    refused_on_send(pair_in(Phase.LOGIN).server, too_many, ErrorCode.MALFORMED)


def test_a_frame_the_peer_would_refuse_as_too_large_is_refused_on_send_unchanged() -> None:
    """Sixteen addresses of 256 bytes make a SITE of 4,129 bytes: the receiver would refuse
    it (TOO_LARGE), so the sender refuses it first, and its state does not move."""
    site = tuple(f"{'h' * 250}-{n:02d}:6910" for n in range(wire.MAX_SITE_ADDRESSES))
    pair = pair_in(Phase.STREAMING)
    before = copy.deepcopy(pair.server.__dict__)
    refused_on_send(pair.server, ev.SiteUpdate(site), ErrorCode.MALFORMED)
    assert pair.server.__dict__ == before
    assert pair.exchange(S, ev.SiteUpdate(site[:8])) == ev.SiteUpdate(site[:8])


def test_a_server_leaves_out_the_last_addresses_until_the_frame_fits() -> None:
    long_names = tuple(f"{'h' * 250}-{n:02d}:6910" for n in range(wire.MAX_SITE_ADDRESSES))
    ok = ev.LoginOk(1, IDENTITY, 4096, 1, ev.LoginFlag(0), "s1", "10.0.0.1:6910", long_names)
    fitted = wire.fit_site(ok)
    assert isinstance(fitted, ev.LoginOk) and fitted.site == long_names[: len(fitted.site)]
    assert len(wire.encode(fitted, ev.Checksum.NONE)[0]) - wire.HEADER_SIZE <= (
        wire.HANDSHAKE_MAX_PAYLOAD
    )
    more = dataclasses.replace(fitted, site=long_names[: len(fitted.site) + 1])
    with pytest.raises(ValueError, match="HANDSHAKE_MAX_PAYLOAD"):
        wire.encode(more, ev.Checksum.NONE)
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    assert pair.exchange(S, fitted) == fitted
    # An address no frame can carry is left out; the rest keep their order.
    odd = ev.Relogin(1000, "move", ("a:1", "x" * 2000 + ":1", "b:2", "\ud800:3"))
    assert wire.fit_site(odd) == ev.Relogin(1000, "move", ("a:1", "b:2"))
    small = ev.SiteUpdate(("a:1", "b:2"))
    assert wire.fit_site(small) is small and wire.fit_site(ev.Done(1)) == ev.Done(1)


def test_error_codes_and_retryable_registry() -> None:
    assert [(code.name, code.value) for code in ErrorCode] == [
        ("MALFORMED", 1), ("UNSUPPORTED_VERSION", 2), ("UNKNOWN_TYPE", 3), ("TOO_LARGE", 4),
        ("BAD_STATE", 5), ("BAD_NAME", 6), ("UNKNOWN_VDISK", 7), ("OUT_OF_RANGE", 8),
        ("READ_ONLY", 9), ("IO_ERROR", 10), ("STOPPING", 11), ("NO_IDENTICAL_REPLICA", 12),
        ("IDENTITY_PENDING", 13), ("BUSY", 14), ("TIMEOUT", 15), ("NOT_ALLOWED", 16),
        ("INTERNAL", 17), ("CHECKSUM", 18),
    ]
    assert {code for code in ErrorCode if code.retryable} == {
        ErrorCode.IO_ERROR, ErrorCode.STOPPING, ErrorCode.NO_IDENTICAL_REPLICA,
        ErrorCode.IDENTITY_PENDING, ErrorCode.BUSY, ErrorCode.TIMEOUT, ErrorCode.INTERNAL,
        ErrorCode.CHECKSUM,
    }


# -- helpers for rule tests -----------------------------------------------------------------


def refused_on_receive(receiver: Connection, data: bytes, code: ErrorCode) -> ProtocolError:
    receiver.receive_data(data)
    with pytest.raises(RemoteProtocolError) as caught:
        drain(receiver)
    assert caught.value.code is code, caught.value
    return caught.value


def refused_on_send(sender: Connection, event: ev.Event, code: ErrorCode) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        sender.send(event)
    assert caught.value.code is code, caught.value


def test_protocol_error_names_its_code() -> None:
    error = RemoteProtocolError(ErrorCode.TOO_LARGE, "READ of 9 bytes")
    assert str(error) == "TOO_LARGE: READ of 9 bytes"
    assert isinstance(error, ProtocolError)


# -- frame header checks, made before the payload is waited for ------------------------------


@pytest.mark.parametrize("role", [C, S])
def test_bad_magic(role: Role) -> None:
    header = wire.HEADER.pack(0x4E42, FrameType.KEEPALIVE, 0, 8, 0)
    refused_on_receive(Connection(role), header, ErrorCode.MALFORMED)


@pytest.mark.parametrize("type_code", [0x00, 0x08, 0x42, 0x80, 0x89, 0xFF])
def test_unknown_frame_type(type_code: int) -> None:
    refused_on_receive(Connection(S), frame(type_code, length=0), ErrorCode.UNKNOWN_TYPE)


@pytest.mark.parametrize("kind", [FrameType.HELLO, FrameType.READ, FrameType.WRITE])
def test_client_frame_sent_to_a_client(kind: FrameType) -> None:
    refused_on_receive(Connection(C), frame(kind, length=4), ErrorCode.BAD_STATE)


@pytest.mark.parametrize("kind", [FrameType.HELLO_REPLY, FrameType.READ_DATA, FrameType.RELOGIN])
def test_server_frame_sent_to_a_server(kind: FrameType) -> None:
    refused_on_receive(Connection(S), frame(kind, length=4), ErrorCode.BAD_STATE)


def test_header_with_huge_length_refused_before_the_payload_arrives() -> None:
    server = Connection(S)
    error = refused_on_receive(
        server, frame(FrameType.HELLO, length=0xFFFFFFFF), ErrorCode.TOO_LARGE
    )
    assert "HELLO" in error.message


@pytest.mark.parametrize(
    ("phase", "role", "kind", "limit"),
    [
        (Phase.HELLO, S, FrameType.HELLO, wire.HANDSHAKE_MAX_PAYLOAD),
        (Phase.HELLO, C, FrameType.GOODBYE, wire.HANDSHAKE_MAX_PAYLOAD),
        (Phase.LOGIN, S, FrameType.LOGIN, wire.HANDSHAKE_MAX_PAYLOAD),
        (Phase.LOGIN, S, FrameType.WRITE, wire.HANDSHAKE_MAX_PAYLOAD),
        (Phase.STREAMING, S, FrameType.KEEPALIVE, wire.HANDSHAKE_MAX_PAYLOAD),
        (Phase.STREAMING, C, FrameType.ERROR, wire.HANDSHAKE_MAX_PAYLOAD),
        (Phase.STREAMING, S, FrameType.WRITE, MAX_REQUEST + 8),  # offset, then the data
        (Phase.STREAMING, C, FrameType.READ_DATA, MAX_REQUEST + 4),  # checksum, then the data
        (Phase.LOGIN, C, FrameType.READ_DATA, wire.HANDSHAKE_MAX_PAYLOAD),
    ],
)
def test_payload_limits(phase: Phase, role: Role, kind: FrameType, limit: int) -> None:
    """A header at the limit waits for its payload; one byte more is refused at once."""
    at_limit = pair_in(phase).side(role)
    at_limit.receive_data(frame(kind, length=limit, request_id=1))
    assert at_limit.next_event() is ev.NEED_DATA
    past_limit = pair_in(phase).side(role)
    refused_on_receive(past_limit, frame(kind, length=limit + 1, request_id=1),
                       ErrorCode.TOO_LARGE)


def test_header_is_not_checked_until_complete() -> None:
    server = Connection(S)
    server.receive_data(b"\xde\xad" + bytes(13))
    assert server.next_event() is ev.NEED_DATA
    server.receive_data(b"\x00")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


# -- payload decoding -----------------------------------------------------------------------


_HELLO_PAYLOAD = encode(HELLO)[wire.HEADER_SIZE :]
_HELLO_FIXED = _HELLO_PAYLOAD[:9]  # versions, max_request, checksum mask: the string follows


@pytest.mark.parametrize(
    ("phase", "data"),
    [
        pytest.param(Phase.HELLO, frame(FrameType.HELLO, b"\x00\x01\x00"), id="short-fixed-part"),
        pytest.param(Phase.HELLO, frame(FrameType.HELLO, _HELLO_PAYLOAD[:-1]), id="short-string"),
        pytest.param(
            Phase.HELLO, frame(FrameType.HELLO, _HELLO_PAYLOAD + b"\x00"), id="trailing-byte"
        ),
        pytest.param(
            Phase.HELLO, frame(FrameType.HELLO, _HELLO_FIXED + b"\x00\x02\xff\xfe"),
            id="string-not-utf8",
        ),
        pytest.param(
            Phase.HELLO,
            frame(FrameType.HELLO, _HELLO_FIXED + (wire.MAX_STRING + 1).to_bytes(2, "big")
                  + b"a" * (wire.MAX_STRING + 1)),
            id="string-over-max-string",
        ),
        pytest.param(
            Phase.HELLO, frame(FrameType.GOODBYE, bytes(4)), id="goodbye-without-string"
        ),
        pytest.param(
            Phase.LOGIN, frame(FrameType.LOGIN, b"\x01\x00\x01d\x00\x01v"),
            id="pinned-without-identity",
        ),
        pytest.param(
            Phase.STREAMING, frame(FrameType.READ, bytes(11), request_id=1), id="read-short"
        ),
        pytest.param(Phase.STREAMING, frame(FrameType.KEEPALIVE, bytes(9)), id="keepalive-long"),
        pytest.param(
            Phase.STREAMING, frame(FrameType.FLUSH, b"\x00", request_id=1),
            id="flush-with-payload",
        ),
    ],
)
def test_malformed_payload_is_refused(phase: Phase, data: bytes) -> None:
    refused_on_receive(pair_in(phase).server, data, ErrorCode.MALFORMED)


def test_unknown_checksum_kind_in_hello_reply() -> None:
    client = Connection(C)
    client.send(HELLO)
    payload = bytes.fromhex("0001 00010000 00000004 07 0000".replace(" ", ""))
    refused_on_receive(client, frame(FrameType.HELLO_REPLY, payload), ErrorCode.MALFORMED)


def test_unknown_error_code_decodes_as_internal() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.client.send(ev.Read(1, 0, 512))
    pair.client.receive_data(frame(FrameType.ERROR, b"\x00\x00\x03\xe7\x00\x00", request_id=1))
    assert pair.client.next_event() == ev.Error(1, ErrorCode.INTERNAL, "")


def test_goodbye_keeps_an_unknown_code() -> None:
    client = Connection(C)
    client.receive_data(frame(FrameType.GOODBYE, b"\x00\x00\x03\xe7\x00\x00"))
    assert client.next_event() == ev.Goodbye(999, "")


def test_unknown_login_flag_bits_are_kept_not_refused() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.client.send(LOGIN)
    data = bytearray(encode(LOGIN_OK))
    data[16 + 13] = 0xFD  # READ_ONLY plus bits this version does not define
    pair.client.receive_data(bytes(data))
    received = pair.client.next_event()
    assert isinstance(received, ev.LoginOk)
    assert ev.LoginFlag.READ_ONLY in received.flags
    assert ev.LoginFlag.FAILOVER not in received.flags


def test_reserved_header_fields_are_ignored() -> None:
    """Flags on frames other than KEEPALIVE, and request ids on frames that carry none."""
    server = Connection(S)
    data = bytearray(encode(HELLO))
    data[3] = 0xFF
    data[8:16] = (12345).to_bytes(8, "big")
    server.receive_data(bytes(data))
    assert server.next_event() == HELLO


# -- checksums ------------------------------------------------------------------------------


def _read_data_frame(request_id: int, data: bytes, crc: int) -> bytes:
    return frame(FrameType.READ_DATA, crc.to_bytes(4, "big") + data, request_id=request_id)


def test_a_read_only_session_carries_no_checksum() -> None:
    """The target checks every block of a read-only session against the manifest: from
    LOGIN_OK with READ_ONLY on, both sides use NONE whatever HELLO agreed."""
    pair = pair_in(Phase.LOGIN)
    assert pair.client.checksum is pair.server.checksum is ev.Checksum.CRC32
    pair.exchange(C, LOGIN)
    pair.exchange(S, ev.LoginOk(1, IDENTITY, 512, 1, ev.LoginFlag.READ_ONLY, "s", "a"))
    assert pair.client.checksum is pair.server.checksum is ev.Checksum.NONE
    pair.exchange(C, ev.Read(1, 0, 9))
    assert pair.exchange(S, ev.ReadData(1, b"123456789")) == ev.ReadData(1, b"123456789")


def test_a_writable_session_keeps_its_checksum() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    pair.exchange(S, ev.LoginOk(1, IDENTITY, 512, 2, ev.LoginFlag(0), "s", "a"))
    assert pair.client.checksum is pair.server.checksum is ev.Checksum.CRC32


def test_checksum_mismatch_is_a_remote_error() -> None:
    pair = pair_in(Phase.STREAMING, login_ok=WRITABLE_LOGIN_OK)
    assert pair.client.checksum is ev.Checksum.CRC32
    pair.client.send(ev.Read(1, 0, 4))
    good = zlib.crc32(b"data")
    error = refused_on_receive(
        pair.client, _read_data_frame(1, b"dat\x00", good), ErrorCode.CHECKSUM
    )
    assert "checksum" in error.message
    assert error.code.retryable  # damaged on the way: another connection may deliver it intact
    assert pair.client.broken


def test_checksum_mismatch_in_the_checksum_field_itself() -> None:
    pair = pair_in(Phase.STREAMING, login_ok=WRITABLE_LOGIN_OK)
    pair.client.send(ev.Read(1, 0, 4))
    bad = zlib.crc32(b"data") ^ 0x80000000
    refused_on_receive(pair.client, _read_data_frame(1, b"data", bad), ErrorCode.CHECKSUM)


def test_checksum_field_ignored_when_none_negotiated() -> None:
    pair = pair_in(Phase.STREAMING, hello=ev.Hello(2, 2, MAX_REQUEST, frozenset(), "t"))
    assert pair.client.checksum is pair.server.checksum is ev.Checksum.NONE
    pair.client.send(ev.Read(1, 0, 4))
    pair.client.receive_data(_read_data_frame(1, b"data", 0xDEADBEEF))
    assert normalize(pair.client.next_event()) == ev.ReadData(1, b"data")


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ({ev.Checksum.CRC32}, ev.Checksum.CRC32),
        ({ev.Checksum.NONE, ev.Checksum.CRC32}, ev.Checksum.CRC32),
        ({ev.Checksum.NONE}, ev.Checksum.NONE),
        (set(), ev.Checksum.NONE),
    ],
)
def test_checksum_negotiation(offered: set[ev.Checksum], chosen: ev.Checksum) -> None:
    pair = ConnectionPair()
    reply = pair.hello(ev.Hello(2, 2, MAX_REQUEST, frozenset(offered), "t"))
    assert reply.checksum is pair.client.checksum is pair.server.checksum is chosen


@pytest.mark.parametrize(
    "offered",
    [{ev.Checksum.CRC32}, {ev.Checksum.NONE, ev.Checksum.CRC32}, {ev.Checksum.NONE}, set()],
)
def test_server_may_choose_no_checksum(offered: set[ev.Checksum]) -> None:
    """negotiate(checksum=False): NONE whatever was offered, e.g. to send blocks by sendfile."""
    hello = ev.Hello(2, 2, MAX_REQUEST, frozenset(offered), "t")
    reply = negotiate(hello, max_request=MAX_REQUEST, max_in_flight=4, server_name="s",
                      checksum=False)
    assert reply.checksum is ev.Checksum.NONE
    pair = pair_in(Phase.STREAMING, hello=hello, checksum=False)
    assert pair.client.checksum is pair.server.checksum is ev.Checksum.NONE
    pair.exchange(C, ev.Read(1, 0, 4))
    sent = pair.server.send(ev.ReadData(1, b"data"))
    assert sent[wire.HEADER_SIZE : wire.HEADER_SIZE + 4] == bytes(4)  # no CRC computed
    pair.client.receive_data(sent)
    assert normalize(pair.client.next_event()) == ev.ReadData(1, b"data")


def test_negotiate_chooses_crc32_by_default() -> None:
    hello = ev.Hello(2, 2, MAX_REQUEST, frozenset({ev.Checksum.CRC32}), "t")
    reply = negotiate(hello, max_request=MAX_REQUEST, max_in_flight=4, server_name="s")
    assert reply.checksum is ev.Checksum.CRC32
    explicit = negotiate(hello, max_request=MAX_REQUEST, max_in_flight=4, server_name="s",
                         checksum=True)
    assert explicit == reply


def test_checksum_not_offered_is_refused() -> None:
    pair = ConnectionPair()
    pair.exchange(C, ev.Hello(2, 2, MAX_REQUEST, frozenset(), "t"))
    reply = ev.HelloReply(2, MAX_REQUEST, 4, ev.Checksum.CRC32, "s")
    refused_on_send(pair.server, reply, ErrorCode.MALFORMED)
    refused_on_receive(pair.client, encode(reply), ErrorCode.MALFORMED)


# -- HELLO: version, max_request, max_in_flight ---------------------------------------------


def test_version_negotiation_failure() -> None:
    pair = ConnectionPair()
    hello = pair.exchange(C, ev.Hello(3, 5, MAX_REQUEST, frozenset(), "pvs-target/9"))
    assert isinstance(hello, ev.Hello)
    with pytest.raises(RemoteProtocolError) as caught:
        negotiate(hello, max_request=MAX_REQUEST, max_in_flight=4, server_name="s")
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    # the server explains and closes; GOODBYE is allowed before HELLO_REPLY
    pair.exchange(S, ev.Goodbye(caught.value.code, caught.value.message))
    assert pair.client.phase is pair.server.phase is Phase.CLOSED


def test_version_range_including_ours_is_accepted() -> None:
    reply = ConnectionPair().hello(ev.Hello(0, 9, MAX_REQUEST, frozenset(), "t"))
    assert reply.version == wire.VERSION == 2


def test_reply_with_a_version_not_offered() -> None:
    pair = ConnectionPair()
    pair.exchange(C, HELLO)
    reply = ev.HelloReply(1, MAX_REQUEST, 4, ev.Checksum.CRC32, "s")
    refused_on_send(pair.server, reply, ErrorCode.UNSUPPORTED_VERSION)
    refused_on_receive(pair.client, encode(reply), ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize(
    ("offered", "server_limit", "agreed"),
    [
        (64 * 1024, 4 * 1024 * 1024, 64 * 1024),
        (64 * 1024 * 1024, 4 * 1024 * 1024, 4 * 1024 * 1024),
        (2**32 - 1, 2**32 - 1, wire.MAX_REQUEST_LIMIT),
        (512, 4 * 1024 * 1024, 512),
    ],
)
def test_max_request_is_the_smallest_limit(offered: int, server_limit: int, agreed: int) -> None:
    pair = ConnectionPair()
    reply = pair.hello(ev.Hello(2, 2, offered, frozenset(), "t"), max_request=server_limit)
    assert reply.max_request == pair.client.max_request == pair.server.max_request == agreed


def test_max_request_below_512_is_refused() -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        negotiate(ev.Hello(2, 2, 511, frozenset(), "t"), max_request=4096, max_in_flight=1,
                  server_name="s")
    assert caught.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize(
    ("max_request", "max_in_flight"),
    [(MAX_REQUEST + 1, 4), (511, 4), (wire.MAX_REQUEST_LIMIT + 1, 4), (MAX_REQUEST, 0)],
)
def test_reply_outside_what_was_offered(max_request: int, max_in_flight: int) -> None:
    pair = ConnectionPair()
    pair.exchange(C, HELLO if max_request <= MAX_REQUEST + 1 else ev.Hello(
        2, 2, 2**32 - 1, frozenset(), "t"))
    reply = ev.HelloReply(2, max_request, max_in_flight, ev.Checksum.NONE, "s")
    refused_on_send(pair.server, reply, ErrorCode.MALFORMED)
    refused_on_receive(pair.client, encode(reply), ErrorCode.MALFORMED)


def test_hello_twice() -> None:
    pair = ConnectionPair()
    pair.exchange(C, HELLO)
    refused_on_send(pair.client, HELLO, ErrorCode.BAD_STATE)
    refused_on_receive(pair.server, encode(HELLO), ErrorCode.BAD_STATE)


def test_hello_reply_before_hello() -> None:
    reply = ev.HelloReply(1, MAX_REQUEST, 4, ev.Checksum.NONE, "s")
    refused_on_send(Connection(S), reply, ErrorCode.BAD_STATE)
    refused_on_receive(Connection(C), encode(reply), ErrorCode.BAD_STATE)


def test_keepalive_not_allowed_before_hello_completes() -> None:
    refused_on_send(Connection(C), ev.Keepalive(1), ErrorCode.BAD_STATE)
    refused_on_receive(Connection(S), encode(ev.Keepalive(1)), ErrorCode.BAD_STATE)


# -- LOGIN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.HELLO, Phase.LOGIN])
def test_read_before_login(phase: Phase) -> None:
    pair = pair_in(phase)
    refused_on_send(pair.client, ev.Read(1, 0, 512), ErrorCode.BAD_STATE)
    refused_on_receive(pair.server, encode(ev.Read(1, 0, 512)), ErrorCode.BAD_STATE)


def test_read_data_before_login() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.client.send(LOGIN)
    data = _read_data_frame(1, b"x", zlib.crc32(b"x"))
    refused_on_receive(pair.client, data, ErrorCode.BAD_STATE)


def test_login_twice_while_pending() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    refused_on_send(pair.client, LOGIN, ErrorCode.BAD_STATE)
    refused_on_receive(pair.server, encode(LOGIN), ErrorCode.BAD_STATE)


def test_login_after_login_ok() -> None:
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, LOGIN, ErrorCode.BAD_STATE)
    refused_on_receive(pair.server, encode(LOGIN), ErrorCode.BAD_STATE)


def test_login_again_after_a_refusal() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    pair.exchange(S, ev.Error(0, ErrorCode.IDENTITY_PENDING, "still hashing"))
    assert pair.client.phase is pair.server.phase is Phase.LOGIN
    pair.login()


def test_keepalive_while_login_is_pending() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    pair.exchange(S, ev.Keepalive(3))
    pair.exchange(C, ev.Keepalive(3, reply=True))
    pair.exchange(S, LOGIN_OK)


@pytest.mark.parametrize(
    "reply", [LOGIN_OK, ev.Redirect("b", "b:1", ""), ev.Error(0, ErrorCode.BUSY, "")],
    ids=["login-ok", "redirect", "error"],
)
def test_login_reply_without_login(reply: ev.Event) -> None:
    pair = pair_in(Phase.LOGIN)
    refused_on_send(pair.server, reply, ErrorCode.BAD_STATE)
    refused_on_receive(pair.client, encode(reply), ErrorCode.BAD_STATE)


def test_redirect_closes_the_connection() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    pair.exchange(S, ev.Redirect("pvs-b", "10.0.0.2:6910", "pvs-b holds win11-lab"))
    assert pair.client.phase is pair.server.phase is Phase.CLOSED
    refused_on_send(pair.client, LOGIN, ErrorCode.BAD_STATE)
    refused_on_send(pair.server, ev.Goodbye(0, ""), ErrorCode.BAD_STATE)


def test_redirected_login_is_carried() -> None:
    pair = pair_in(Phase.LOGIN)
    received = pair.exchange(C, ev.Login("d", "v", IDENTITY, redirected=True))
    assert isinstance(received, ev.Login)
    assert received.redirected
    assert received.pinned == IDENTITY


_REDIRECT = ev.Redirect("pvs-c", "10.0.0.3:6910", "pvs-c holds win11-lab")


def test_redirect_of_a_redirected_login_is_refused_both_ways() -> None:
    """A redirected LOGIN is served or refused, never redirected again: no loop can form."""
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, ev.Login("d", "v", IDENTITY, redirected=True))
    refused_on_send(pair.server, _REDIRECT, ErrorCode.BAD_STATE)
    assert pair.server.phase is Phase.LOGIN  # the refusal changed nothing: it may still answer
    refused_on_receive(copy.deepcopy(pair.client), encode(_REDIRECT), ErrorCode.BAD_STATE)
    pair.exchange(S, ev.Error(0, ErrorCode.NO_IDENTICAL_REPLICA, "not here either"))
    assert pair.client.phase is pair.server.phase is Phase.LOGIN


@pytest.mark.parametrize("answer", ["login-ok", "error"])
def test_redirected_login_may_be_served_or_refused(answer: str) -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, ev.Login("d", "v", IDENTITY, redirected=True))
    if answer == "login-ok":
        pair.exchange(S, LOGIN_OK)
        assert pair.client.phase is pair.server.phase is Phase.STREAMING
    else:
        pair.exchange(S, ev.Error(0, ErrorCode.BUSY, "taken"))
        assert pair.client.phase is pair.server.phase is Phase.LOGIN


def test_redirect_rule_follows_the_latest_login() -> None:
    """The flag belongs to each LOGIN: after a refused redirected one, a plain one may move."""
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, ev.Login("d", "v", redirected=True))
    pair.exchange(S, ev.Error(0, ErrorCode.IDENTITY_PENDING, "hashing"))
    pair.exchange(C, ev.Login("d", "v", redirected=False))
    pair.exchange(S, _REDIRECT)
    assert pair.client.phase is pair.server.phase is Phase.CLOSED


@pytest.mark.parametrize("request_id", [1, 2**64 - 1])
def test_login_error_must_have_request_id_zero(request_id: int) -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    refused = ev.Error(request_id, ErrorCode.BUSY, "taken")
    refused_on_send(pair.server, refused, ErrorCode.MALFORMED)
    refused_on_receive(copy.deepcopy(pair.client), encode(refused), ErrorCode.MALFORMED)
    pair.exchange(S, ev.Error(0, ErrorCode.BUSY, "taken"))  # the LOGIN was still pending


def _login_ok_with_mode(mode: int) -> bytes:
    data = bytearray(encode(LOGIN_OK))
    data[wire.HEADER_SIZE + 12] = mode  # session_id (8), block_size (4), then mode
    return bytes(data)


@pytest.mark.parametrize("mode", [Mode.standard, Mode.private])
def test_login_ok_carries_every_known_mode(mode: Mode) -> None:
    pair = pair_in(Phase.LOGIN)
    pair.client.send(LOGIN)
    pair.client.receive_data(_login_ok_with_mode(mode.code))
    received = pair.client.next_event()
    assert isinstance(received, ev.LoginOk)
    assert Mode.from_code(received.mode) is mode


@pytest.mark.parametrize("mode", [0, 3, 0xFF])
def test_login_ok_with_an_unknown_mode_is_malformed(mode: int) -> None:
    pair = pair_in(Phase.LOGIN)
    pair.client.send(LOGIN)
    error = refused_on_receive(pair.client, _login_ok_with_mode(mode), ErrorCode.MALFORMED)
    assert f"mode {mode}" in error.message
    assert pair.client.phase is Phase.LOGIN


# -- streaming: requests and replies --------------------------------------------------------


def test_pipelined_requests_answered_in_any_order() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(10, 0, 8))
    pair.exchange(C, ev.Write(11, 8, b"w"))
    pair.exchange(C, ev.Flush(12))
    pair.exchange(C, ev.Read(13, 0, 1))
    assert pair.client.outstanding == pair.server.outstanding == 4
    pair.exchange(S, ev.Done(12))
    pair.exchange(S, ev.ReadData(13, b"z"))
    pair.exchange(S, ev.Error(11, ErrorCode.READ_ONLY, "Standard Image"))
    pair.exchange(S, ev.ReadData(10, bytes(8)))
    assert pair.client.outstanding == pair.server.outstanding == 0


def test_request_id_may_be_reused_once_answered() -> None:
    pair = pair_in(Phase.STREAMING)
    for _ in range(3):
        pair.exchange(C, ev.Flush(1))
        pair.exchange(S, ev.Done(1))


def test_duplicate_request_id() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(5, 0, 512))
    refused_on_send(pair.client, ev.Flush(5), ErrorCode.MALFORMED)
    refused_on_receive(pair.server, encode(ev.Write(5, 0, b"x")), ErrorCode.MALFORMED)


def test_request_id_zero_is_reserved() -> None:
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, ev.Read(0, 0, 512), ErrorCode.MALFORMED)
    refused_on_receive(pair.server, encode(ev.Flush(0)), ErrorCode.MALFORMED)


def test_max_in_flight_exceeded() -> None:
    pair = pair_in(Phase.STREAMING, max_in_flight=2)
    pair.exchange(C, ev.Read(1, 0, 512))
    pair.exchange(C, ev.Flush(2))
    refused_on_send(pair.client, ev.Read(3, 0, 512), ErrorCode.TOO_LARGE)
    refused_on_receive(pair.server, encode(ev.Read(3, 0, 512)), ErrorCode.TOO_LARGE)


def test_a_reply_frees_a_slot() -> None:
    pair = pair_in(Phase.STREAMING, max_in_flight=1)
    pair.exchange(C, ev.Read(1, 0, 512))
    pair.exchange(S, ev.Error(1, ErrorCode.IO_ERROR, "disk"))
    pair.exchange(C, ev.Read(2, 0, 512))


def test_read_of_zero_bytes_is_malformed() -> None:
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, ev.Read(1, 0, 0), ErrorCode.MALFORMED)
    assert pair.client.outstanding == 0
    refused_on_receive(pair.server, encode(ev.Read(1, 0, 0)), ErrorCode.MALFORMED)


@pytest.mark.parametrize("length", [MAX_REQUEST + 1, 2**32 - 1])
def test_read_longer_than_max_request_is_too_large(length: int) -> None:
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, ev.Read(1, 0, length), ErrorCode.TOO_LARGE)
    assert pair.client.outstanding == 0
    refused_on_receive(pair.server, encode(ev.Read(1, 0, length)), ErrorCode.TOO_LARGE)


def test_read_of_exactly_max_request() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, MAX_REQUEST))
    pair.exchange(S, ev.ReadData(1, bytes(MAX_REQUEST)))


def test_write_of_zero_bytes_is_malformed() -> None:
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, ev.Write(1, 0, b""), ErrorCode.MALFORMED)
    assert pair.client.outstanding == 0
    refused_on_receive(pair.server, encode(ev.Write(1, 0, b"")), ErrorCode.MALFORMED)


def test_write_longer_than_max_request_is_too_large() -> None:
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, ev.Write(1, 0, bytes(MAX_REQUEST + 1)), ErrorCode.TOO_LARGE)
    assert pair.client.outstanding == 0
    pair.exchange(C, ev.Write(1, 0, bytes(MAX_REQUEST)))  # the largest is fine, and id 1 free
    # from a peer, one byte over is already past the WRITE payload limit of the header
    refused_on_receive(pair.server, encode(ev.Write(2, 0, bytes(MAX_REQUEST + 1))),
                       ErrorCode.TOO_LARGE)


@pytest.mark.parametrize(
    "reply", [ev.ReadData(99, b"x"), ev.Done(99), ev.Error(99, ErrorCode.IO_ERROR, "")],
    ids=["read-data", "done", "error"],
)
def test_reply_to_unknown_request(reply: ev.Event) -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, 1))
    refused_on_send(pair.server, reply, ErrorCode.MALFORMED)
    refused_on_receive(pair.client, encode(reply, ev.Checksum.CRC32), ErrorCode.MALFORMED)


def _refused_reply_keeps_the_request(
    pair: ConnectionPair, wrong: ev.Event, right: ev.Event
) -> None:
    """A refused reply answers nothing: the request stays outstanding on both sides."""
    assert pair.server.outstanding == pair.client.outstanding == 1
    refused_on_send(pair.server, wrong, ErrorCode.MALFORMED)
    assert pair.server.outstanding == 1
    refused_on_receive(pair.client, encode(wrong, ev.Checksum.CRC32), ErrorCode.MALFORMED)
    assert pair.client.outstanding == 1
    # the server's mistake was caught before it reached the wire: it can still answer properly
    pair.server.send(right)
    assert pair.server.outstanding == 0


@pytest.mark.parametrize("size", [511, 513])
def test_read_data_of_wrong_length(size: int) -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, 512))
    _refused_reply_keeps_the_request(pair, ev.ReadData(1, bytes(size)), ev.ReadData(1, bytes(512)))


def test_done_for_a_read() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, 512))
    _refused_reply_keeps_the_request(pair, ev.Done(1), ev.ReadData(1, bytes(512)))


@pytest.mark.parametrize("request_", [ev.Write(1, 0, b"x"), ev.Flush(1)], ids=["write", "flush"])
def test_read_data_for_a_write_or_flush(request_: ev.Event) -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, request_)
    _refused_reply_keeps_the_request(pair, ev.ReadData(1, b"x"), ev.Done(1))


def test_refused_read_data_leaves_other_requests_alone() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, 8))
    pair.exchange(C, ev.Flush(2))
    refused_on_send(pair.server, ev.ReadData(1, bytes(7)), ErrorCode.MALFORMED)
    pair.exchange(S, ev.Done(2))
    pair.exchange(S, ev.ReadData(1, bytes(8)))
    assert pair.client.outstanding == pair.server.outstanding == 0


def test_connection_level_error_does_not_touch_requests() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, 512))
    pair.exchange(S, ev.Error(0, ErrorCode.INTERNAL, "about to close"))
    assert pair.client.outstanding == 1
    assert pair.client.phase is Phase.STREAMING


def test_requests_are_still_answered_after_relogin() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(C, ev.Read(1, 0, 512))
    pair.exchange(C, ev.Flush(2))
    pair.exchange(S, ev.Relogin(10_000, "pvs-a is stopping"))
    pair.exchange(S, ev.ReadData(1, bytes(512)))
    pair.exchange(S, ev.Done(2))
    pair.exchange(C, ev.Goodbye(0, "moved to pvs-b"))
    assert pair.client.phase is pair.server.phase is Phase.CLOSED


@pytest.mark.parametrize("phase", [Phase.HELLO, Phase.LOGIN])
def test_relogin_only_while_streaming(phase: Phase) -> None:
    pair = pair_in(phase)
    refused_on_send(pair.server, ev.Relogin(1, ""), ErrorCode.BAD_STATE)
    refused_on_receive(pair.client, encode(ev.Relogin(1, "")), ErrorCode.BAD_STATE)


def test_a_read_only_flag_is_not_enforced_by_the_state_machine() -> None:
    """READ_ONLY is a session rule: the server answers a WRITE with ERROR READ_ONLY."""
    pair = pair_in(Phase.STREAMING)
    assert LOGIN_OK.flags & ev.LoginFlag.READ_ONLY
    pair.exchange(C, ev.Write(1, 0, b"x"))
    pair.exchange(S, ev.Error(1, ErrorCode.READ_ONLY, "Standard Image: write to your cache"))


# -- GOODBYE and the closed phase -----------------------------------------------------------


@pytest.mark.parametrize("role", [C, S])
@pytest.mark.parametrize("phase", [Phase.HELLO, Phase.LOGIN, Phase.STREAMING])
def test_goodbye_closes_both_sides(phase: Phase, role: Role) -> None:
    pair = pair_in(phase)
    if phase is Phase.STREAMING:
        pair.exchange(C, ev.Read(1, 0, 512))
    pair.exchange(role, ev.Goodbye(ErrorCode.STOPPING, "bye"))
    assert pair.client.phase is pair.server.phase is Phase.CLOSED
    refused_on_send(pair.client, ev.Goodbye(0, ""), ErrorCode.BAD_STATE)
    refused_on_send(pair.server, ev.Keepalive(1), ErrorCode.BAD_STATE)


@pytest.mark.parametrize(
    "data",
    [encode(ev.Keepalive(1)), encode(ev.Goodbye(0, "")), b"garbage that is not a frame"],
    ids=["keepalive", "goodbye", "garbage"],
)
def test_after_close_next_event_returns_need_data(data: bytes) -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(S, ev.Goodbye(0, ""))
    pair.client.receive_data(data)
    assert pair.client.next_event() is ev.NEED_DATA
    assert pair.client.next_event() is ev.NEED_DATA


# -- after a protocol error: broken ----------------------------------------------------------

_BAD_MAGIC = wire.HEADER.pack(0x4E42, FrameType.KEEPALIVE, 0, 8, 0) + bytes(8)


def _breaches(role: Role) -> list[bytes]:
    """A header breach, a payload breach and a rule breach (in any phase), refused by ``role``."""
    rule = encode(ev.Done(77)) if role is C else encode(ev.Flush(0))
    return [_BAD_MAGIC, frame(FrameType.KEEPALIVE, bytes(7)), rule]


@pytest.mark.parametrize("breach", [0, 1, 2], ids=["header", "payload", "rule"])
@pytest.mark.parametrize("role", [C, S])
@pytest.mark.parametrize("phase", [Phase.HELLO, Phase.LOGIN, Phase.STREAMING])
def test_after_a_protocol_error_nothing_more_is_decoded(
    phase: Phase, role: Role, breach: int
) -> None:
    pair = pair_in(phase)
    receiver = pair.side(role)
    assert not receiver.broken
    good = encode(ev.Goodbye(0, "")) if phase is Phase.HELLO else encode(ev.Keepalive(1))
    with pytest.raises(RemoteProtocolError):
        receiver.receive_data(_breaches(role)[breach] + good)
        drain(receiver)
    assert receiver.broken
    assert receiver.phase is phase  # broken is not closed: a GOODBYE may still explain why
    receiver.receive_data(good)
    assert receiver.next_event() is ev.NEED_DATA  # frame boundaries can no longer be trusted
    assert receiver.next_event() is ev.NEED_DATA


@pytest.mark.parametrize("role", [C, S])
def test_after_a_protocol_error_only_goodbye_may_be_sent(role: Role) -> None:
    pair = pair_in(Phase.STREAMING)
    if role is C:
        pair.exchange(C, ev.Read(1, 0, 512))
    receiver = pair.side(role)
    with pytest.raises(RemoteProtocolError):
        receiver.receive_data(_BAD_MAGIC)
        receiver.next_event()
    before = copy.deepcopy(receiver.__dict__)
    others: list[ev.Event] = (
        [ev.Keepalive(1), ev.Read(2, 0, 512), ev.Flush(3)] if role is C
        else [ev.Keepalive(1), ev.Relogin(1, ""), ev.Error(0, ErrorCode.INTERNAL, "")]
    )
    for event in others:
        refused_on_send(receiver, event, ErrorCode.BAD_STATE)
        assert receiver.__dict__ == before
    received = pair.send(role, ev.Goodbye(ErrorCode.MALFORMED, "bad magic"))
    assert received == [ev.Goodbye(ErrorCode.MALFORMED, "bad magic")]
    assert pair.client.phase is pair.server.phase is Phase.CLOSED


def test_a_refused_send_does_not_break_the_connection() -> None:
    """LocalProtocolError is our own bug caught before the wire: the connection goes on."""
    pair = pair_in(Phase.STREAMING)
    refused_on_send(pair.client, ev.Read(0, 0, 512), ErrorCode.MALFORMED)
    assert not pair.client.broken
    pair.exchange(C, ev.Read(1, 0, 512))
    pair.exchange(S, ev.ReadData(1, bytes(512)))


def test_goodbye_from_the_peer_is_not_a_breach() -> None:
    pair = pair_in(Phase.STREAMING)
    pair.exchange(S, ev.Goodbye(ErrorCode.STOPPING, "bye"))
    assert not pair.client.broken
    assert pair.client.phase is Phase.CLOSED


# -- events that cannot be encoded ----------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "role", "event"),
    [
        (Phase.HELLO, C, ev.Hello(2, 2, MAX_REQUEST, frozenset(), "x" * (wire.MAX_STRING + 1))),
        (Phase.HELLO, C, ev.Hello(2, 2, MAX_REQUEST, frozenset(), "é" * 513)),  # 1026 bytes
        (Phase.HELLO, C, ev.Hello(2, 2, MAX_REQUEST, frozenset(), "\ud800")),  # not UTF-8
        (Phase.HELLO, C, ev.Hello(1, 0x10000, MAX_REQUEST, frozenset(), "")),
        (Phase.LOGIN, C, ev.Login("d" * (wire.MAX_STRING + 1), "v")),
        (Phase.STREAMING, C, ev.Read(2**64, 0, 512)),
        (Phase.STREAMING, C, ev.Read(1, -1, 512)),
        (Phase.STREAMING, C, ev.Write(1, 2**64, b"x")),
        (Phase.STREAMING, C, ev.Keepalive(-1)),
        (Phase.STREAMING, S, ev.Relogin(2**32, "")),
        (Phase.STREAMING, S, ev.Goodbye(-1, "")),
        (Phase.STREAMING, S, ev.Goodbye(0, "x" * (wire.MAX_STRING + 1))),
    ],
    ids=[
        "string-too-long", "string-too-long-in-utf8", "string-not-utf8", "version-too-large",
        "login-name-too-long", "request-id-too-large", "negative-offset", "offset-too-large",
        "negative-token", "deadline-too-large", "negative-goodbye-code", "goodbye-too-long",
    ],
)
def test_unencodable_event_is_a_local_error_and_changes_nothing(
    phase: Phase, role: Role, event: ev.Event
) -> None:
    pair = pair_in(phase)
    sender = pair.side(role)
    before = copy.deepcopy(sender.__dict__)
    refused_on_send(sender, event, ErrorCode.MALFORMED)
    assert sender.__dict__ == before
    assert not sender.broken
    # nothing was marked sent: the connection goes on as if the attempt never happened
    if phase is Phase.HELLO:
        pair.hello()
    elif phase is Phase.LOGIN:
        pair.login()
    else:
        pair.exchange(C, ev.Read(1, 0, 512))
        assert pair.client.outstanding == pair.server.outstanding == 1


def test_unencodable_login_ok_does_not_start_streaming() -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    too_long = ev.LoginOk(1, IDENTITY, 512, 1, ev.LoginFlag(0), "s" * (wire.MAX_STRING + 1), "")
    refused_on_send(pair.server, too_long, ErrorCode.MALFORMED)
    assert pair.server.phase is Phase.LOGIN
    pair.exchange(S, LOGIN_OK)  # the LOGIN is still pending and can be answered


# -- mode codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 3])
def test_login_ok_with_an_unknown_mode_is_refused_on_send(mode: int) -> None:
    pair = pair_in(Phase.LOGIN)
    pair.exchange(C, LOGIN)
    bad = ev.LoginOk(1, IDENTITY, 512, mode, ev.LoginFlag(0), "s", "a")
    before = copy.deepcopy(pair.server.__dict__)
    refused_on_send(pair.server, bad, ErrorCode.MALFORMED)
    assert pair.server.__dict__ == before
