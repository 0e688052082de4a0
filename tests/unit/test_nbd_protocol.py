"""The sans-IO NBD server: handshake, validation, replies, and robustness to any input.

A test plays the client by writing raw bytes (``Client`` below builds them without any state
machine, so it can break every rule) and reads what the server decoded and queued. Every byte
vector is also fed byte by byte and in random cuts: TCP may split anything anywhere.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvs_target.nbd import wire
from pvs_target.nbd.events import (
    MAX_BLOCK_SIZE,
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
from pvs_target.nbd.protocol import DISCARD_LIMIT, MAX_OPTION_DATA, NbdServerConnection, Phase
from pvs_target.nbd.wire import CommandFlag, CommandKind, NbdError, Option, Reply
from pvs_target.nbd.wire import TransmissionFlag as TF

SIZE = 1024 * 1024
EXPORT = ExportInfo("disk", SIZE, read_only=False, preferred_block_size=4096,
                    description="a test disk", fast_zero=True)
READ_ONLY = ExportInfo("disk", SIZE, read_only=True)
ALIGNED = ExportInfo("disk", SIZE, read_only=False, minimum_block_size=512)
FLAGS = wire.ClientFlag.FIXED_NEWSTYLE | wire.ClientFlag.NO_ZEROES


def option(code: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(wire.IHAVEOPT, code, len(data)) + data


def go_data(name: str = "disk", infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (wire.U32.pack(len(raw)) + raw + wire.U16.pack(len(infos))
            + b"".join(wire.U16.pack(i) for i in infos))


def request(kind: int, offset: int = 0, length: int = 0, handle: int = 7, flags: int = 0, *,
            payload: bytes = b"") -> bytes:
    return wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, kind, handle, offset, length) + payload


def feed(connection: NbdServerConnection, data: bytes, cut: str = "whole") -> list[Event]:
    """Feed ``data`` whole or byte by byte; return every event decoded."""
    pieces = [data] if cut == "whole" else [data[i : i + 1] for i in range(len(data))]
    events: list[Event] = []
    for piece in pieces:
        connection.receive_data(piece)
        while (event := connection.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    while data:
        magic, opt, reply, length = wire.OPTION_REPLY.unpack_from(data)
        assert magic == wire.OPTION_REPLY_MAGIC
        start = wire.OPTION_REPLY.size
        replies.append((opt, reply, data[start : start + length]))
        data = data[start + length :]
    return replies


def connected(export: ExportInfo = EXPORT, *, structured: bool = False,
              cut: str = "whole") -> NbdServerConnection:
    """A connection in transmission phase, reached through GO."""
    server = NbdServerConnection(export)
    server.data_to_send()
    opening = wire.CLIENT_FLAGS.pack(FLAGS)
    if structured:
        opening += option(Option.STRUCTURED_REPLY)
    events = feed(server, opening + option(Option.GO, go_data()), cut)
    assert isinstance(events[-1], TransmissionStarted)
    server.data_to_send()
    return server


CUTS = pytest.mark.parametrize("cut", ["whole", "bytes"])


# -- handshake ----------------------------------------------------------------------------


def test_greeting() -> None:
    server = NbdServerConnection(EXPORT)
    greeting = server.data_to_send()
    assert greeting == struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3)
    assert server.data_to_send() == b""
    assert server.phase is Phase.HANDSHAKE


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_end_the_connection(flags: int) -> None:
    server = NbdServerConnection(EXPORT)
    server.receive_data(wire.CLIENT_FLAGS.pack(flags))
    with pytest.raises(NbdProtocolError) as caught:
        server.next_event()
    assert caught.value.reason == "bad_client_flags"
    assert server.phase is Phase.BROKEN
    with pytest.raises(NbdProtocolError):  # broken for good
        server.next_event()


@CUTS
@pytest.mark.parametrize("no_zeroes", [True, False])
@pytest.mark.parametrize("name", ["disk", ""])
def test_export_name(cut: str, no_zeroes: bool, name: str) -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    flags = FLAGS if no_zeroes else wire.ClientFlag.FIXED_NEWSTYLE
    events = feed(server, wire.CLIENT_FLAGS.pack(flags) + option(Option.EXPORT_NAME,
                                                                 name.encode()), cut)
    assert len(events) == 1 and isinstance(events[0], TransmissionStarted)
    reply = server.data_to_send()
    assert len(reply) == (10 if no_zeroes else 134)
    size, transmission = wire.EXPORT_NAME_REPLY.unpack_from(reply)
    assert size == SIZE
    assert transmission == TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | (
        TF.SEND_WRITE_ZEROES | TF.SEND_CACHE | TF.SEND_FAST_ZERO)
    assert reply[10:] == bytes(len(reply) - 10)
    assert server.phase is Phase.TRANSMISSION


def test_export_name_of_unknown_export_ends_the_connection() -> None:
    server = NbdServerConnection(EXPORT)
    server.receive_data(wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.EXPORT_NAME, b"other"))
    with pytest.raises(NbdProtocolError, match="no such export"):
        server.next_event()


@CUTS
def test_go_with_info_requests(cut: str) -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    infos = (wire.Info.NAME, wire.Info.DESCRIPTION, wire.Info.BLOCK_SIZE, 99)
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.STRUCTURED_REPLY)
                  + option(Option.GO, go_data("disk", infos)), cut)
    assert events[0] == OptionHandled(Option.STRUCTURED_REPLY, Reply.ACK)
    started = events[1]
    assert isinstance(started, TransmissionStarted) and started.structured_replies
    assert started.flags & TF.SEND_DF
    replies = parse_option_replies(server.data_to_send())
    assert replies[0] == (Option.STRUCTURED_REPLY, Reply.ACK, b"")
    assert all(opt == Option.GO for opt, _, _ in replies[1:])
    assert replies[-1][1:] == (Reply.ACK, b"")
    info = {struct.unpack(">H", payload[:2])[0]: payload[2:] for _, reply, payload
            in replies[1:-1] if reply == Reply.INFO}
    size, flags = struct.unpack(">QH", info[wire.Info.EXPORT])
    assert size == SIZE and flags == started.flags
    assert struct.unpack(">III", info[wire.Info.BLOCK_SIZE]) == (1, 4096, MAX_BLOCK_SIZE)
    assert info[wire.Info.NAME] == b"disk"
    assert info[wire.Info.DESCRIPTION] == b"a test disk"


def test_info_then_go_agree_and_read_only_flags() -> None:
    server = NbdServerConnection(READ_ONLY)
    server.data_to_send()
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.INFO, go_data()))
    assert events == [OptionHandled(Option.INFO, Reply.ACK)]
    info = parse_option_replies(server.data_to_send())
    events = feed(server, option(Option.GO, go_data()))
    assert isinstance(events[0], TransmissionStarted)
    go = parse_option_replies(server.data_to_send())
    assert [r[1:] for r in info] == [r[1:] for r in go]
    assert events[0].flags == TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_CACHE


def test_go_unknown_export_is_an_error_reply_and_negotiation_goes_on() -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.GO, go_data("nope")))
    assert isinstance(events[0], OptionHandled) and events[0].reply == Reply.ERR_UNKNOWN
    [(opt, reply, message)] = parse_option_replies(server.data_to_send())
    assert (opt, reply) == (Option.GO, Reply.ERR_UNKNOWN) and b"disk" in message
    assert server.phase is Phase.OPTIONS
    assert isinstance(feed(server, option(Option.GO, go_data()))[0], TransmissionStarted)


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x05ab", go_data() + b"x", go_data()[:-1],
                                  b"\0\0\0\0\0\x02\0\0"])
def test_malformed_go_is_invalid(data: bytes) -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.GO, data))
    assert events == [OptionHandled(Option.GO, Reply.ERR_INVALID, "malformed request")]


def test_list() -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.LIST))
    [server_entry, ack] = parse_option_replies(server.data_to_send())
    assert server_entry[:2] == (Option.LIST, Reply.SERVER)
    assert server_entry[2] == b"\0\0\0\x04diska test disk"
    assert ack == (Option.LIST, Reply.ACK, b"")
    feed(server, option(Option.LIST, b"x"))
    assert parse_option_replies(server.data_to_send())[0][1] == Reply.ERR_INVALID


def test_abort() -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.ABORT) + b"junk")
    assert events == [Aborted()]
    assert parse_option_replies(server.data_to_send()) == [(Option.ABORT, Reply.ACK, b"")]
    assert server.phase is Phase.CLOSED


@pytest.mark.parametrize("code", [Option.STARTTLS, Option.SET_META_CONTEXT,
                                  Option.EXTENDED_HEADERS, 4, 12345, 0xFFFFFFFF])
def test_unknown_options_are_unsupported_and_the_next_one_parses(code: int) -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(code, b"some data")
                  + option(Option.GO, go_data()))
    assert isinstance(events[0], OptionHandled) and events[0].reply == Reply.ERR_UNSUP
    assert isinstance(events[1], TransmissionStarted)


@pytest.mark.parametrize(("code", "reply"), [(Option.GO, Reply.ERR_TOO_BIG), (77, Reply.ERR_UNSUP)])
def test_oversized_option_is_skipped_unkept(code: int, reply: Reply) -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    big = MAX_OPTION_DATA + 1
    feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + wire.OPTION_HEADER.pack(wire.IHAVEOPT, code, big))
    for _ in range(big // 1000):
        feed(server, bytes(1000))
        assert len(server._buffer) <= 1000  # skipped as it comes, never accumulated
    events = feed(server, bytes(big % 1000) + option(Option.GO, go_data()))
    assert isinstance(events[0], OptionHandled) and events[0].reply == reply
    assert isinstance(events[1], TransmissionStarted)


def test_export_name_too_long_ends_the_connection() -> None:
    server = NbdServerConnection(EXPORT)
    server.receive_data(wire.CLIENT_FLAGS.pack(FLAGS)
                        + wire.OPTION_HEADER.pack(wire.IHAVEOPT, Option.EXPORT_NAME, 1 << 30))
    with pytest.raises(NbdProtocolError):
        server.next_event()


def test_bad_option_magic() -> None:
    server = NbdServerConnection(EXPORT)
    server.receive_data(wire.CLIENT_FLAGS.pack(FLAGS) + b"IHAVEOPX" + bytes(8))
    with pytest.raises(NbdProtocolError, match="IHAVEOPT"):
        server.next_event()


def test_shutdown_refuses_options_but_abort() -> None:
    server = NbdServerConnection(EXPORT)
    server.data_to_send()
    server.shutdown()
    events = feed(server, wire.CLIENT_FLAGS.pack(FLAGS) + option(Option.GO, go_data())
                  + option(Option.ABORT))
    assert isinstance(events[0], OptionHandled) and events[0].reply == Reply.ERR_SHUTDOWN
    assert events[1] == Aborted()


# -- transmission -------------------------------------------------------------------------


@CUTS
def test_read_and_write_commands(cut: str) -> None:
    server = connected(cut=cut)
    payload = bytes(range(256)) * 40
    events = feed(server, request(CommandKind.READ, 4096, 512, handle=1)
                  + request(CommandKind.WRITE, 100, len(payload), handle=2,
                            flags=CommandFlag.FUA, payload=payload)
                  + request(CommandKind.FLUSH, handle=3)
                  + request(CommandKind.TRIM, 0, 8192, handle=4)
                  + request(CommandKind.WRITE_ZEROES, 0, 8192, handle=5,
                            flags=CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO)
                  + request(CommandKind.CACHE, 0, 65536, handle=6), cut)
    assert events == [
        Command(1, CommandKind.READ, 4096, 512, CommandFlag(0), None),
        Command(2, CommandKind.WRITE, 100, len(payload), CommandFlag.FUA, bytearray(payload)),
        Command(3, CommandKind.FLUSH, 0, 0, CommandFlag(0), None),
        Command(4, CommandKind.TRIM, 0, 8192, CommandFlag(0), None),
        Command(5, CommandKind.WRITE_ZEROES, 0, 8192,
                CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO, None),
        Command(6, CommandKind.CACHE, 0, 65536, CommandFlag(0), None),
    ]
    assert server.data_to_send() == b""


def test_large_write_payload_arrives_whole_in_random_pieces() -> None:
    server = connected()
    payload = bytes(range(251)) * 4000
    data = request(CommandKind.WRITE, 0, len(payload), payload=payload) + request(
        CommandKind.DISC)
    events: list[Event] = []
    step = 1
    position = 0
    while position < len(data):
        server.receive_data(memoryview(data)[position : position + step])
        position += step
        step = step * 3 % 70001 + 1
        while (event := server.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [Command(7, CommandKind.WRITE, 0, len(payload), CommandFlag(0),
                              bytearray(payload)), Disconnect()]


def test_zero_length_write() -> None:
    server = connected()
    assert feed(server, request(CommandKind.WRITE, 10, 0)) == [
        Command(7, CommandKind.WRITE, 10, 0, CommandFlag(0), bytearray())]


def test_disconnect_ignores_what_follows() -> None:
    server = connected()
    assert feed(server, request(CommandKind.DISC) + request(CommandKind.READ, 0, 1)) == [
        Disconnect()]
    assert server.phase is Phase.CLOSED
    assert feed(server, b"anything at all") == []


REFUSALS = [
    # (export, structured, request fields, error)
    (EXPORT, False, dict(kind=9), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.BLOCK_STATUS, length=512), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.READ, length=512, flags=CommandFlag.NO_HOLE),
     NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.READ, length=512, flags=CommandFlag.DF),
     NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.READ, length=512, flags=1 << 15), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.READ, offset=SIZE - 1, length=2), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.READ, offset=2**64 - 1, length=1), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.TRIM, offset=SIZE, length=1), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.WRITE_ZEROES, offset=SIZE, length=1),
     NbdError.ENOSPC),
    (EXPORT, False, dict(kind=CommandKind.READ, length=MAX_BLOCK_SIZE + 1), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.CACHE, length=MAX_BLOCK_SIZE + 1), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.FLUSH, offset=1), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.FLUSH, length=1), NbdError.EINVAL),
    (EXPORT, False, dict(kind=CommandKind.WRITE_ZEROES, length=1, flags=CommandFlag.DF),
     NbdError.EINVAL),
    (READ_ONLY, False, dict(kind=CommandKind.TRIM, length=512), NbdError.EPERM),
    (READ_ONLY, False, dict(kind=CommandKind.WRITE_ZEROES, length=512), NbdError.EPERM),
    (READ_ONLY, False, dict(kind=CommandKind.READ, length=512, flags=CommandFlag.FUA),
     NbdError.EINVAL),
    (ALIGNED, False,
     dict(kind=CommandKind.READ, offset=1, length=512), NbdError.EINVAL),
    (ALIGNED, False, dict(kind=CommandKind.TRIM, offset=0, length=100),
     NbdError.EINVAL),
    (ExportInfo("disk", SIZE, False), False,
     dict(kind=CommandKind.WRITE_ZEROES, length=512, flags=CommandFlag.FAST_ZERO),
     NbdError.ENOTSUP),
]


@pytest.mark.parametrize(("export", "structured", "fields", "error"), REFUSALS)
def test_refusals(export: ExportInfo, structured: bool, fields: dict[str, Any],
                  error: NbdError) -> None:
    server = connected(export, structured=structured)
    events = feed(server, request(**fields) + request(CommandKind.READ, 0, 512, handle=8))
    assert len(events) == 2
    refused = events[0]
    assert isinstance(refused, Refused) and refused.error == error and refused.handle == 7
    assert refused.message
    assert events[1] == Command(8, CommandKind.READ, 0, 512, CommandFlag(0), None)


def test_df_is_allowed_with_structured_replies() -> None:
    server = connected(structured=True)
    [event] = feed(server, request(CommandKind.READ, 0, 512, flags=CommandFlag.DF))
    assert isinstance(event, Command) and event.flags == CommandFlag.DF


@CUTS
@pytest.mark.parametrize(("export", "fields", "error"), [
    (READ_ONLY, dict(offset=0, length=4096), NbdError.EPERM),
    (EXPORT, dict(offset=SIZE - 100, length=4096), NbdError.ENOSPC),
    (EXPORT, dict(offset=0, length=MAX_BLOCK_SIZE + 1), NbdError.EINVAL),
    (EXPORT, dict(offset=0, length=4096, flags=CommandFlag.DF), NbdError.EINVAL),
])
def test_refused_write_payload_is_consumed(cut: str, export: ExportInfo,
                                           fields: dict[str, Any], error: NbdError) -> None:
    server = connected(export, cut=cut)
    length = fields["length"]
    data = request(CommandKind.WRITE, **fields) + bytes(length)
    if cut == "bytes" and length > 10000:
        cut = "whole"
    events = feed(server, data + request(CommandKind.READ, 0, 1, handle=9), cut)
    assert isinstance(events[0], Refused) and events[0].error == error
    assert events[1] == Command(9, CommandKind.READ, 0, 1, CommandFlag(0), None)


def test_refused_write_past_the_discard_limit_ends_the_connection() -> None:
    server = connected()
    server.receive_data(request(CommandKind.WRITE, 0, DISCARD_LIMIT + 1))
    with pytest.raises(NbdProtocolError) as caught:
        server.next_event()
    assert caught.value.reason == "write_too_large"


def test_bad_request_magic() -> None:
    server = connected()
    server.receive_data(b"\x25\x60\x95\x14" + bytes(24))
    with pytest.raises(NbdProtocolError, match="request magic"):
        server.next_event()


def test_shutdown_refuses_new_requests() -> None:
    server = connected()
    server.shutdown()
    [event] = feed(server, request(CommandKind.READ, 0, 1))
    assert isinstance(event, Refused) and event.error == NbdError.ESHUTDOWN


# -- replies ------------------------------------------------------------------------------


def test_simple_replies() -> None:
    server = connected()
    header, data = server.reply_read(0x1122, 4096, b"abc")
    assert header == struct.pack(">IIQ", 0x67446698, 0, 0x1122) and data == b"abc"
    assert server.reply_ok(5) == struct.pack(">IIQ", 0x67446698, 0, 5)
    assert server.reply_error(5, CommandKind.READ, NbdError.EIO, "broken", 10) == struct.pack(
        ">IIQ", 0x67446698, 5, 5)


def test_structured_replies() -> None:
    server = connected(structured=True)
    header, data = server.reply_read(9, 4096, b"abc")
    assert header == struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, 9, 11, 4096) and data == b"abc"
    [empty] = server.reply_read(9, 0, b"")
    assert empty == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 9, 0)
    assert server.reply_ok(9) == struct.pack(">IIQ", 0x67446698, 0, 9)
    error = server.reply_error(9, CommandKind.READ, NbdError.ENOSPC, "full")
    assert error == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 9, 10, 28, 4) + b"full"
    at = server.reply_error(9, CommandKind.WRITE, NbdError.EIO, "bad", offset=512)
    assert at == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8002, 9, 17, 5, 3) + b"bad" + (
        struct.pack(">Q", 512))
    flush = server.reply_error(9, CommandKind.FLUSH, NbdError.EIO, "x", offset=512)
    assert struct.unpack_from(">H", flush, 6)[0] == 0x8001  # no ERROR_OFFSET for FLUSH
    long = server.reply_error(9, CommandKind.READ, NbdError.EIO, "é" * 5000)
    assert struct.unpack_from(">H", long, 24)[0] == 4096


def test_export_info_validation() -> None:
    for bad in (dict(preferred_block_size=1000), dict(preferred_block_size=256),
                dict(minimum_block_size=4096), dict(size=-1), dict(name="a\0b")):
        arguments = dict(name="d", size=SIZE, read_only=False) | bad
        with pytest.raises(ValueError):
            ExportInfo(**arguments)  # type: ignore[arg-type]


def test_errno_mapping() -> None:
    import errno

    assert wire.error_from_errno(errno.ENOSPC) is NbdError.ENOSPC
    assert wire.error_from_errno(errno.EDQUOT) is NbdError.ENOSPC
    assert wire.error_from_errno(errno.EROFS) is NbdError.EPERM
    assert wire.error_from_errno(errno.ECONNRESET) is NbdError.EIO


# -- any input ----------------------------------------------------------------------------

FUZZ = settings(max_examples=600, deadline=None)


def _drain_fuzz(server: NbdServerConnection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            for _ in range(10_000):
                if server.next_event() is NEED_DATA:
                    break
            server.data_to_send()
    except NbdProtocolError:
        assert server.phase is Phase.BROKEN


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_in_handshake(chunks: list[bytes]) -> None:
    _drain_fuzz(NbdServerConnection(EXPORT), chunks)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_bytes_after_flags(chunks: list[bytes]) -> None:
    server = NbdServerConnection(EXPORT)
    feed(server, wire.CLIENT_FLAGS.pack(FLAGS))
    _drain_fuzz(server, chunks)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=8), st.booleans())
def test_random_bytes_in_transmission(chunks: list[bytes], structured: bool) -> None:
    _drain_fuzz(connected(structured=structured), chunks)


options = st.builds(
    option,
    st.one_of(st.sampled_from(list(Option)), st.integers(0, 2**32 - 1)),
    st.one_of(st.binary(max_size=40), st.builds(go_data, st.sampled_from(["disk", "", "x"]),
                                                st.lists(st.integers(0, 5)).map(tuple))),
)
requests = st.builds(
    request,
    st.integers(0, 9),
    st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**16 - 1),
)


@FUZZ
@given(st.lists(st.one_of(options, requests, st.binary(max_size=30)), max_size=12),
       st.integers(1, 50))
def test_plausible_frames_in_any_cut(frames: list[bytes], step: int) -> None:
    """Well-framed but arbitrary options and requests: the same events whole or cut up."""
    data = wire.CLIENT_FLAGS.pack(FLAGS) + b"".join(frames)
    outcomes = []
    for size in (len(data) or 1, step):
        server = NbdServerConnection(EXPORT)
        events: list[Event] = []
        try:
            for at in range(0, len(data), size):
                server.receive_data(data[at : at + size])
                while (event := server.next_event()) is not NEED_DATA:
                    events.append(event)
            error = None
        except NbdProtocolError as caught:
            error = caught.reason
        outcomes.append((events, error, server.data_to_send()))
    assert outcomes[0] == outcomes[1]
