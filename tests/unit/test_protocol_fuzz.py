"""Property-based tests of the protocol state machine.

(a) Whatever bytes a peer sends, in whatever phase, ``next_event`` yields events or NEED_DATA or
    raises the module's own RemoteProtocolError: a server must never die of struct.error on a
    frame. After that error the connection is broken: it decodes nothing more and sends only
    GOODBYE.
(b) A valid frame cut anywhere is NEED_DATA, never an error: TCP may split frames anywhere.
(c) Every valid event, sent and received through a real handshake, arrives unchanged.
(d) Whatever event a side tries to send, in whatever phase, it is either sent or refused with
    LocalProtocolError, and a refusal changes nothing.
"""

from __future__ import annotations

import copy
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import (
    HELLO,
    LOGIN,
    MAX_REQUEST,
    ConnectionPair,
    encode,
    normalize,
    pair_in,
    split,
)

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import Connection, Phase, Role
from pvs_protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity
from pvs_protocol.modes import Mode

C, S = Role.CLIENT, Role.SERVER
EVENT_TYPES = typing.get_args(ev.Event)
FUZZ = settings(max_examples=1000, deadline=None)
ROUND_TRIP = settings(max_examples=200, deadline=None)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
request_ids = st.one_of(st.integers(1, 8), st.integers(1, 2**64 - 1))
texts = st.one_of(st.text(max_size=24), st.text(min_size=200, max_size=wire.MAX_STRING // 4))
identities = st.builds(
    ReplicaIdentity, u32, u64, u64, st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE),
    st.integers(0, 31).map(lambda bits: 1 << bits),
)
checksum_sets = st.frozensets(st.sampled_from(ev.Checksum))
modes = st.sampled_from([mode.code for mode in Mode])
hellos = st.builds(ev.Hello, u16, u16, u32, checksum_sets, texts)

# -- a conversation: a starting phase, then events sent in turn ------------------------------

Conversation = tuple[Phase, ev.Hello, list[tuple[Role, ev.Event]]]


@st.composite
def hello_conversations(draw: st.DrawFn) -> Conversation:
    reply = ev.HelloReply(
        version=draw(u16),
        max_request=draw(st.integers(512, wire.MAX_REQUEST_LIMIT)),
        max_in_flight=draw(st.integers(1, 2**32 - 1)),
        checksum=draw(st.sampled_from(ev.Checksum)),
        server_name=draw(texts),
    )
    offered = draw(checksum_sets) | {reply.checksum}
    hello = ev.Hello(
        draw(st.integers(0, reply.version)), draw(st.integers(reply.version, 0xFFFF)),
        draw(st.integers(reply.max_request, 2**32 - 1)), offered, draw(texts),
    )
    return Phase.HELLO, HELLO, [(C, hello), (S, reply)]


@st.composite
def login_conversations(draw: st.DrawFn) -> Conversation:
    """A LOGIN and a valid answer: no REDIRECT of a redirected LOGIN, ERROR with id 0."""
    login = ev.Login(draw(texts), draw(texts), draw(st.none() | identities), draw(st.booleans()))
    answers: list[st.SearchStrategy[ev.Event]] = [
        st.builds(ev.LoginOk, u64, identities, u32, modes, u8.map(ev.LoginFlag), texts, texts),
        st.builds(ev.Error, st.just(0), st.sampled_from(ErrorCode), texts),
    ]
    if not login.redirected:
        answers.append(st.builds(ev.Redirect, texts, texts, texts))
    reply: ev.Event = draw(st.one_of(answers))
    return Phase.LOGIN, HELLO, [(C, login), (S, reply)]


@st.composite
def streaming_conversations(draw: st.DrawFn) -> Conversation:
    """Requests up to max_in_flight, answered in any order, perhaps after a RELOGIN."""
    checksums = draw(checksum_sets)
    hello = ev.Hello(2, 2, MAX_REQUEST, checksums, "fuzz")
    ids = draw(st.lists(request_ids, min_size=1, max_size=4, unique=True))
    blocks = st.binary(min_size=1, max_size=1024)
    requests: list[ev.Read | ev.Write | ev.Flush | ev.Digests] = [
        draw(st.one_of(
            st.builds(ev.Read, st.just(rid), u64, st.integers(1, 1024)),
            st.builds(ev.Digests, st.just(rid), u8, u64, st.integers(1, wire.MAX_DIGEST_PAGE)),
            st.builds(ev.Write, st.just(rid), u64, blocks),
            st.builds(ev.Flush, st.just(rid)),
        ))
        for rid in ids
    ]
    replies: list[ev.Event] = []
    for request in draw(st.permutations(requests)):
        if draw(st.booleans()):
            replies.append(ev.Error(request.request_id, draw(st.sampled_from(ErrorCode)),
                                    draw(texts)))
        elif isinstance(request, ev.Read | ev.Digests):
            data = draw(st.binary(min_size=request.length, max_size=request.length))
            replies.append(ev.ReadData(request.request_id, data))
        else:
            replies.append(ev.Done(request.request_id))
    if draw(st.booleans()):
        replies.insert(draw(st.integers(0, len(replies))), ev.Relogin(draw(u32), draw(texts)))
    steps: list[tuple[Role, ev.Event]] = [(C, r) for r in requests] + [(S, r) for r in replies]
    return Phase.STREAMING, hello, steps


@st.composite
def any_phase_conversations(draw: st.DrawFn) -> Conversation:
    """KEEPALIVE and its reply, then perhaps GOODBYE, from either side."""
    phase = draw(st.sampled_from([Phase.HELLO, Phase.LOGIN, Phase.STREAMING]))
    role = draw(st.sampled_from(Role))
    other = S if role is C else C
    steps: list[tuple[Role, ev.Event]] = []
    if phase is not Phase.HELLO:
        token = draw(u64)
        steps += [(role, ev.Keepalive(token)), (other, ev.Keepalive(token, reply=True))]
    if phase is Phase.HELLO or draw(st.booleans()):
        steps.append((draw(st.sampled_from(Role)), ev.Goodbye(draw(u32), draw(texts))))
    return phase, HELLO, steps


conversations = st.one_of(
    hello_conversations(), login_conversations(), streaming_conversations(),
    any_phase_conversations(),
)


def _start(phase: Phase, hello: ev.Hello) -> ConnectionPair:
    return pair_in(phase, hello=hello)


@ROUND_TRIP
@given(conversations, st.data())
def test_valid_events_round_trip(conversation: Conversation, data: st.DataObject) -> None:
    phase, hello, steps = conversation
    pair = _start(phase, hello)
    for role, event in steps:
        sent = pair.side(role).send(event)
        receiver = pair.peer(role)
        cuts = data.draw(st.lists(st.integers(0, 64), max_size=4), label="chunk sizes")
        received = []
        for chunk in split(sent, cuts):
            receiver.receive_data(chunk)
            if (decoded := receiver.next_event()) is not ev.NEED_DATA:
                received.append(normalize(decoded))
        assert received == [normalize(event)]
        assert receiver.next_event() is ev.NEED_DATA
    assert pair.client.phase is pair.server.phase
    assert pair.client.outstanding == pair.server.outstanding


@ROUND_TRIP
@given(conversations)
def test_a_truncated_frame_is_need_data(conversation: Conversation) -> None:
    phase, hello, steps = conversation
    pair = _start(phase, hello)
    for role, event in steps:
        sent = pair.side(role).send(event)
        receiver = pair.peer(role)
        for position in range(len(sent) - 1):
            receiver.receive_data(sent[position : position + 1])
            assert receiver.next_event() is ev.NEED_DATA
        receiver.receive_data(sent[-1:])
        assert normalize(receiver.next_event()) == normalize(event)


# -- (a) hostile input ----------------------------------------------------------------------

# What each side has sent before the hostile bytes arrive, so replies have something to match.
_PREPARATION: dict[tuple[Role, Phase], list[ev.Event]] = {
    (C, Phase.HELLO): [HELLO],
    (C, Phase.LOGIN): [LOGIN],
    (C, Phase.STREAMING): [
        ev.Read(1, 0, 16), ev.Read(2, 4096, 512), ev.Write(3, 0, b"w"), ev.Flush(4),
    ],
}


def _receiver(role: Role, phase: Phase) -> Connection:
    pair = pair_in(phase)
    for event in _PREPARATION.get((role, phase), []):
        pair.exchange(C, event)
    return pair.side(role)


def _valid_frames(role: Role, phase: Phase) -> list[bytes]:
    """Frames a well-behaved peer could send to ``role`` in ``phase``: seeds for mutation."""
    crc = ev.Checksum.CRC32
    common = [encode(ev.Keepalive(9)), encode(ev.Keepalive(9, True)), encode(ev.Goodbye(4, "x"))]
    by_side: dict[tuple[Role, Phase], list[ev.Event]] = {
        (S, Phase.HELLO): [HELLO],
        (S, Phase.LOGIN): [LOGIN, ev.Login("d", "v", ReplicaIdentity(1, 2, 3, bytes(32)), True)],
        (S, Phase.STREAMING): [ev.Read(1, 0, 512), ev.Write(2, 8, b"abc"), ev.Flush(3)],
        (C, Phase.HELLO): [ev.HelloReply(1, MAX_REQUEST, 4, ev.Checksum.CRC32, "s")],
        (C, Phase.LOGIN): [
            ev.LoginOk(1, ReplicaIdentity(1, 2, 3, bytes(32)), 512, 1, ev.LoginFlag(3), "s", "a"),
            ev.Redirect("b", "b:1", "why"), ev.Error(0, ErrorCode.BUSY, "busy"),
        ],
        (C, Phase.STREAMING): [
            ev.ReadData(1, bytes(16)), ev.ReadData(2, bytes(512)), ev.Done(3), ev.Done(4),
            ev.Error(2, ErrorCode.OUT_OF_RANGE, "end"), ev.Relogin(1000, "stopping"),
        ],
    }
    return [encode(event, crc) for event in by_side[(role, phase)]] + common


@st.composite
def random_frames(draw: st.DrawFn) -> bytes:
    """A header that mostly looks right, over a payload that mostly does not."""
    payload = draw(st.binary(max_size=96))
    return wire.HEADER.pack(
        draw(st.sampled_from([wire.MAGIC, wire.MAGIC, 0, 0x5057])),
        draw(st.one_of(st.sampled_from(wire.FrameType), u8)),
        draw(st.sampled_from([0, wire.FLAG_REPLY]) | u8),
        draw(st.one_of(st.just(len(payload)), st.integers(0, 128), u32)),
        draw(st.one_of(st.integers(0, 5), u64)),
    ) + payload


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        match draw(st.sampled_from(["replace", "delete", "insert"])):
            case "replace":
                data[position] = draw(u8)
            case "delete" if len(data) > 1:
                del data[position]
            case _:
                data.insert(position, draw(u8))
    return bytes(data)


@st.composite
def hostile_input(draw: st.DrawFn) -> tuple[Role, Phase, bytes]:
    role = draw(st.sampled_from(Role))
    phase = draw(st.sampled_from([Phase.HELLO, Phase.LOGIN, Phase.STREAMING]))
    seeds = _valid_frames(role, phase)
    pieces = draw(st.lists(
        st.one_of(st.binary(max_size=64), random_frames(), mutated(seeds), st.sampled_from(seeds)),
        min_size=1, max_size=4,
    ))
    return role, phase, b"".join(pieces)


@FUZZ
@given(hostile_input(), st.lists(st.integers(1, 48), max_size=6))
def test_hostile_bytes_give_events_or_a_protocol_error(
    case: tuple[Role, Phase, bytes], cuts: list[int]
) -> None:
    role, phase, data = case
    receiver = _receiver(role, phase)
    try:
        for chunk in split(data, cuts):
            receiver.receive_data(chunk)
            while (event := receiver.next_event()) is not ev.NEED_DATA:
                assert isinstance(event, EVENT_TYPES)
    except RemoteProtocolError as error:
        assert isinstance(error.code, ErrorCode)
        # broken: nothing more is decoded, and GOODBYE is all that may still be sent
        assert receiver.broken
        assert receiver.phase is not Phase.CLOSED
        receiver.receive_data(data)
        assert receiver.next_event() is ev.NEED_DATA
        with pytest.raises(LocalProtocolError):
            receiver.send(ev.Keepalive(1))
        receiver.send(ev.Goodbye(error.code, error.message))
        assert receiver.phase is Phase.CLOSED
    else:
        assert not receiver.broken


# -- (d) whatever we try to send ------------------------------------------------------------

# Numbers mostly in range, sometimes far outside any wire field; strings sometimes past
# MAX_STRING once encoded.
wide = st.one_of(st.integers(0, 8), u32, u64, st.integers(-(2**70), 2**70))
any_texts = st.one_of(texts, st.text(min_size=wire.MAX_STRING - 2, max_size=wire.MAX_STRING + 2))
any_events: st.SearchStrategy[ev.Event] = st.one_of(
    st.builds(ev.Hello, wide, wide, wide, checksum_sets, any_texts),
    st.builds(ev.HelloReply, wide, wide, wide, st.sampled_from(ev.Checksum), any_texts),
    st.builds(ev.Login, any_texts, any_texts, st.none() | identities, st.booleans(), any_texts),
    st.builds(ev.LoginOk, wide, identities, wide, modes | st.integers(0, 255),
              st.integers(0, 2**10).map(ev.LoginFlag), any_texts, any_texts),
    st.builds(ev.Redirect, any_texts, any_texts, any_texts),
    st.builds(ev.Read, wide, wide, wide),
    st.builds(ev.ReadData, wide, st.binary(max_size=600)),
    st.builds(ev.Write, wide, wide, st.binary(max_size=600)),
    st.builds(ev.Flush, wide),
    st.builds(ev.Digests, wide, wide, wide, wide),
    st.builds(ev.Damaged, wide, any_texts),
    st.builds(ev.Done, wide),
    st.builds(ev.Error, wide, st.sampled_from(ErrorCode), any_texts),
    st.builds(ev.Relogin, wide, any_texts),
    st.builds(ev.SiteUpdate, st.lists(texts, max_size=20).map(tuple)),
    st.builds(ev.Keepalive, wide, st.booleans()),
    st.builds(ev.Goodbye, wide, any_texts),
)


def _pair_for_sending(start: str) -> ConnectionPair:
    """Pairs at the points where most events have something to match."""
    match start:
        case "fresh":
            return ConnectionPair()
        case "hello-sent":
            pair = ConnectionPair()
            pair.exchange(C, HELLO)
            return pair
        case "login":
            return pair_in(Phase.LOGIN)
        case "login-sent" | "redirected-login-sent":
            pair = pair_in(Phase.LOGIN)
            pair.exchange(C, ev.Login("d", "v", redirected=start == "redirected-login-sent"))
            return pair
    pair = pair_in(Phase.STREAMING)
    for event in _PREPARATION[(C, Phase.STREAMING)]:
        pair.exchange(C, event)
    return pair


@ROUND_TRIP
@given(
    st.sampled_from(
        ["fresh", "hello-sent", "login", "login-sent", "redirected-login-sent", "streaming"]
    ),
    st.lists(st.tuples(st.sampled_from(Role), any_events), min_size=1, max_size=6),
)
def test_a_send_is_either_made_and_accepted_or_refused_with_no_change(
    start: str, attempts: list[tuple[Role, ev.Event]]
) -> None:
    pair = _pair_for_sending(start)
    for role, event in attempts:
        if pair.client.phase is Phase.CLOSED:
            break
        sender, receiver = pair.side(role), pair.peer(role)
        before = copy.deepcopy(sender.__dict__)
        try:
            data = sender.send(event)
        except LocalProtocolError as error:
            assert isinstance(error.code, ErrorCode)
            assert sender.__dict__ == before, f"refused {event!r} but changed the state"
            continue
        # what one side agreed to send, the other, in step with it, accepts unchanged
        receiver.receive_data(data)
        assert normalize(receiver.next_event()) == normalize(event)
        assert receiver.next_event() is ev.NEED_DATA
        assert pair.client.phase is pair.server.phase
        assert pair.client.outstanding == pair.server.outstanding
