"""Bad input against a real pvsd, from raw sockets: every case ends with a normal target.

A protocol error must end that one connection (with GOODBYE and the right code where the
connection can still carry it) and a clear log line; a request the server cannot serve is
answered with ERROR and the connection goes on. After each case the same server process must
still be alive and serve a real target byte for byte: no case may hurt anyone else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import (
    MIB,
    Closed,
    Pvsd,
    RawClient,
    Servers,
    assert_serves,
    encoded,
    frame,
    ignore_disconnects,
    image_path,
    make_vdisk,
    process_memory_kib,
    read_frame_bytes,
    string,
)

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.errors import ErrorCode
from pvs_protocol.wire import FrameType

GOOD = "good"  # the vDisk every check after a case reads
BIG = "big"  # room for many 1 MiB reads


@dataclasses.dataclass(frozen=True)
class Victim:
    """A server under attack, and the images it serves."""

    server: Pvsd
    images: dict[str, bytes]

    @property
    def address(self) -> str:
        return self.server.address

    async def still_serves(self) -> None:
        await assert_serves(self.server, GOOD, self.images[GOOD])

    async def protocol_error_logged(self, client: RawClient, code: ErrorCode) -> str:
        line = await self.server.until_log("protocol_error", peer=client.local_address)
        assert line["code"] == code.name, line
        assert line.get("error"), f"the log line says nothing about what was wrong: {line}"
        return str(line["error"])


def _make_images(store: Path) -> dict[str, bytes]:
    if not image_path(store, GOOD).exists():
        make_vdisk(store, GOOD, MIB + 512, seed=31)
        make_vdisk(store, BIG, 8 * MIB, seed=32)
    return {name: image_path(store, name).read_bytes() for name in (GOOD, BIG)}


@pytest.fixture(scope="module")
def victim(module_servers: Servers) -> Victim:
    images = _make_images(module_servers.workdir / "store")
    return Victim(module_servers("victim", vdisks=[GOOD, BIG]), images)


@pytest.fixture(scope="module")
def impatient(module_servers: Servers) -> Victim:
    """Short handshake and idle timeouts."""
    images = _make_images(module_servers.workdir / "store")
    server = module_servers(
        "impatient", vdisks=[GOOD, BIG],
        args=["--handshake-timeout", "1", "--idle-timeout", "1"],
    )
    return Victim(server, images)


@pytest.fixture(scope="module")
def narrow(module_servers: Servers) -> Victim:
    """Only 4 requests in flight per target."""
    images = _make_images(module_servers.workdir / "store")
    server = module_servers("narrow", vdisks=[GOOD, BIG], args=["--max-in-flight", "4"])
    return Victim(server, images)


@pytest.fixture
async def client(victim: Victim) -> AsyncIterator[RawClient]:
    raw = await RawClient.connect(victim.address)
    try:
        yield raw
    finally:
        await raw.close()


async def _setup(client: RawClient, phase: str) -> None:
    if phase in ("login", "streaming"):
        await client.hello(max_request=64 * 1024)
    if phase == "streaming":
        reply = await client.login(GOOD)
        assert isinstance(reply, ev.LoginOk), reply


# -- protocol errors: the connection ends with GOODBYE <code> ------------------------------------

_READ = struct.pack(">QI", 0, 512)
_HELLO = encoded(ev.Hello(2, 2, MIB, frozenset(), "raw"))
_LOGIN = encoded(ev.Login("raw-target", GOOD))


@dataclasses.dataclass(frozen=True)
class Breach:
    phase: str
    """What the client has done before: "hello" (nothing), "login" (HELLO), "streaming"."""
    data: bytes
    code: ErrorCode
    words: str
    """A word the server's log line must contain, so that it says what was wrong."""


BREACHES = {
    # the header
    "bad magic first": Breach("hello", frame(FrameType.HELLO, magic=0x4745), ErrorCode.MALFORMED,
                              "magic"),
    "bad magic streaming": Breach("streaming", frame(FrameType.READ, _READ, 1, magic=0),
                                  ErrorCode.MALFORMED, "magic"),
    "http request": Breach("hello", b"GET / HTTP/1.1\r\nHost: pvs\r\n\r\n", ErrorCode.MALFORMED,
                           "magic"),
    "type 0x00": Breach("hello", frame(0x00), ErrorCode.UNKNOWN_TYPE, "type"),
    "type 0x09": Breach("login", frame(0x09), ErrorCode.UNKNOWN_TYPE, "type"),
    "type 0x7f streaming": Breach("streaming", frame(0x7F, b"", 1), ErrorCode.UNKNOWN_TYPE,
                                  "type"),
    "type 0xff": Breach("hello", frame(0xFF), ErrorCode.UNKNOWN_TYPE, "type"),
    "server frame READ_DATA": Breach("streaming", frame(FrameType.READ_DATA, bytes(516), 1),
                                     ErrorCode.BAD_STATE, "READ_DATA"),
    "server frame HELLO_REPLY": Breach("hello", frame(FrameType.HELLO_REPLY), ErrorCode.BAD_STATE,
                                       "HELLO_REPLY"),
    # lengths past the limit, announced in the header: refused without waiting for a payload
    "HELLO of 0xFFFFFFFF bytes": Breach(
        "hello", frame(FrameType.HELLO, length=0xFFFFFFFF), ErrorCode.TOO_LARGE, "limit"
    ),
    "LOGIN of 4097 bytes": Breach(
        "login", frame(FrameType.LOGIN, length=wire.HANDSHAKE_MAX_PAYLOAD + 1),
        ErrorCode.TOO_LARGE, "limit",
    ),
    "READ of 0xFFFFFFFF bytes": Breach(
        "streaming", frame(FrameType.READ, request_id=1, length=0xFFFFFFFF), ErrorCode.TOO_LARGE,
        "limit",
    ),
    "WRITE past max_request": Breach(
        "streaming", frame(FrameType.WRITE, request_id=1, length=64 * 1024 + 9),
        ErrorCode.TOO_LARGE, "limit",
    ),
    "KEEPALIVE of 0xFFFFFFFF bytes": Breach(
        "streaming", frame(FrameType.KEEPALIVE, length=0xFFFFFFFF), ErrorCode.TOO_LARGE, "limit"
    ),
    "WRITE before login of 4097 bytes": Breach(
        "login", frame(FrameType.WRITE, request_id=1, length=wire.HANDSHAKE_MAX_PAYLOAD + 1),
        ErrorCode.TOO_LARGE, "limit",
    ),
    # frames in the wrong phase
    "READ before HELLO": Breach("hello", frame(FrameType.READ, _READ, 1), ErrorCode.BAD_STATE,
                                "Read"),
    "READ before LOGIN": Breach("login", frame(FrameType.READ, _READ, 1), ErrorCode.BAD_STATE,
                                "Read"),
    "LOGIN before HELLO": Breach("hello", _LOGIN, ErrorCode.BAD_STATE, "Login"),
    "KEEPALIVE before HELLO": Breach("hello", frame(FrameType.KEEPALIVE, bytes(8)),
                                     ErrorCode.BAD_STATE, "Keepalive"),
    "second HELLO": Breach("login", _HELLO, ErrorCode.BAD_STATE, "Hello"),
    "LOGIN while streaming": Breach("streaming", _LOGIN, ErrorCode.BAD_STATE, "Login"),
    # request rules
    "request id 0": Breach("streaming", frame(FrameType.READ, _READ, 0), ErrorCode.MALFORMED,
                           "request id"),
    "READ of zero bytes": Breach("streaming", frame(FrameType.READ, struct.pack(">QI", 0, 0), 1),
                                 ErrorCode.MALFORMED, "zero"),
    "READ above max_request": Breach(
        "streaming", frame(FrameType.READ, struct.pack(">QI", 0, 64 * 1024 + 1), 1),
        ErrorCode.TOO_LARGE, "READ",
    ),
    # payloads that do not decode
    "READ payload short": Breach("streaming", frame(FrameType.READ, _READ[:-1], 1),
                                 ErrorCode.MALFORMED, "short"),
    "READ payload with trailing bytes": Breach("streaming", frame(FrameType.READ, _READ + b"x", 1),
                                               ErrorCode.MALFORMED, "trailing"),
    "name longer than MAX_STRING": Breach(
        "login", frame(FrameType.LOGIN, b"\0" + string("dev") + string("a" * 1025)),
        ErrorCode.MALFORMED, "string",
    ),
    "name not UTF-8": Breach(
        "login", frame(FrameType.LOGIN, b"\0" + string("dev") + string(b"\xff\xfe")),
        ErrorCode.MALFORMED, "UTF-8",
    ),
    "string past the end of the frame": Breach(
        "login", frame(FrameType.LOGIN, b"\0" + string("dev") + string(b"good", length=200)),
        ErrorCode.MALFORMED, "short",
    ),
    "pinned identity missing": Breach(
        "login", frame(FrameType.LOGIN, b"\x01" + string("dev") + string(GOOD)),
        ErrorCode.MALFORMED, "short",
    ),
    # negotiation
    "unsupported version": Breach(
        "hello", encoded(ev.Hello(3, 4, MIB, frozenset(), "future")),
        ErrorCode.UNSUPPORTED_VERSION, "version",
    ),
    "max_request below 512": Breach(
        "hello", encoded(ev.Hello(2, 2, 511, frozenset(), "tiny")),
        ErrorCode.MALFORMED, "512",
    ),
}


@pytest.mark.parametrize("case", BREACHES.values(), ids=BREACHES.keys())
async def test_protocol_error_ends_the_connection_with_goodbye(
    victim: Victim, client: RawClient, case: Breach
) -> None:
    await _setup(client, case.phase)
    with ignore_disconnects():  # the server may close before it has read all we send
        await client.send(bytes(case.data))
    goodbye = await client.expect_goodbye()
    assert goodbye is not None, "closed without GOODBYE"
    assert goodbye.code == case.code, goodbye
    assert goodbye.message
    error = await victim.protocol_error_logged(client, case.code)
    assert case.words.lower() in error.lower(), error
    await victim.still_serves()


# -- requests that fail but leave the connection working -----------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        ("size", 1),  # just past the end
        ("size-512", 1024),  # straddles the end
        ("size-1", 2),
        (1 << 40, 512),
        ((1 << 64) - 1, 1),  # offset + length overflows 64 bits
        ((1 << 64) - 512, 4096),
        (1 << 63, 512),
    ],
)
async def test_read_past_the_end_is_out_of_range_and_the_connection_goes_on(
    victim: Victim, client: RawClient, offset: int | str, length: int
) -> None:
    image = victim.images[GOOD]
    size = len(image)
    at = {"size": size, "size-512": size - 512, "size-1": size - 1}.get(str(offset), offset)
    assert isinstance(at, int)
    await client.start(GOOD)
    reply = await client.read(at, length)
    assert isinstance(reply, ev.Error), reply
    assert reply.code is ErrorCode.OUT_OF_RANGE
    assert reply.message
    await victim.server.until_log(
        "request_refused", peer=client.local_address, code="OUT_OF_RANGE"
    )
    # The same connection still reads, up to the very last byte.
    last = await client.read(size - 512, 512)
    assert isinstance(last, ev.ReadData) and bytes(last.data) == image[-512:]
    await victim.still_serves()


async def test_write_to_a_standard_image_is_refused_and_the_connection_goes_on(
    victim: Victim, client: RawClient
) -> None:
    await client.start(GOOD)
    await client.send_event(ev.Write(7, 0, b"\0" * 512))
    reply = await client.read_event()
    assert isinstance(reply, ev.Error) and reply.request_id == 7, reply
    assert reply.code is ErrorCode.READ_ONLY
    await client.send_event(ev.Flush(8))
    assert await client.read_event() == ev.Done(8)
    await client.send_event(ev.Keepalive(0xFEED))
    assert await client.read_event() == ev.Keepalive(0xFEED, reply=True)
    data = await client.read(0, 4096)
    assert isinstance(data, ev.ReadData) and bytes(data.data) == victim.images[GOOD][:4096]
    assert image_path(victim.server.stores[0], GOOD).read_bytes() == victim.images[GOOD]
    await victim.still_serves()


async def test_reserved_flag_bits_and_unused_request_ids_are_ignored(
    victim: Victim, client: RawClient
) -> None:
    """A receiver ignores reserved header flag bits, and the request id of frames that carry
    none (docs/protocol.md, Frame header): such frames are served as if they were clean."""
    hello = encoded(ev.Hello(2, 2, MIB, frozenset(), "raw"))
    await client.send(frame(FrameType.HELLO, hello[wire.HEADER_SIZE :], 0xDEAD, flags=0xFE))
    assert isinstance(await client.read_event(), ev.HelloReply)
    await client.send(frame(FrameType.KEEPALIVE, struct.pack(">Q", 5), 77, flags=0x80))
    assert await client.read_event() == ev.Keepalive(5, reply=True)
    # A keepalive that is itself an answer is not answered: the next frame is LOGIN_OK.
    await client.send_event(ev.Keepalive(6, reply=True))
    login = encoded(ev.Login("raw-target", GOOD))
    await client.send(frame(FrameType.LOGIN, login[wire.HEADER_SIZE :], 0xBEEF, flags=0xFF))
    assert isinstance(await client.read_event(), ev.LoginOk)
    await client.send(frame(FrameType.READ, struct.pack(">QI", 1024, 512), 9, flags=0xF0))
    data = await client.read_event()
    assert isinstance(data, ev.ReadData) and data.request_id == 9, data
    assert bytes(data.data) == victim.images[GOOD][1024:1536]
    await victim.still_serves()


@pytest.mark.parametrize("phase", ["hello", "login", "streaming"])
async def test_goodbye_from_the_client_closes_the_connection_quietly(
    victim: Victim, client: RawClient, phase: str
) -> None:
    await _setup(client, phase)
    await client.send_event(ev.Goodbye(0, "done"))
    with ignore_disconnects():  # anything after GOODBYE is discarded
        await client.send(read_frame_bytes(1, 0, 512))
    assert await client.expect_closed() == [], "nothing is sent after the target's GOODBYE"
    await victim.server.until_log("target_said_goodbye", peer=client.local_address)
    await victim.still_serves()


# -- logins that are refused but leave the connection in the login phase ---------------------


BAD_NAMES = {
    "dot-dot-slash": "../x",
    "empty": "",
    "300 characters": "a" * 300,
    "slash": "a/b",
    "absolute path": "/etc/passwd",
    "NUL": "good\0",
    "newline": "good\n",
    "unicode": "gööd",
    "dot-dot": "..",
    "hidden": ".good",
    "space": "go od",
}


async def _refused_then_served(
    victim: Victim, client: RawClient, login: ev.Login, code: ErrorCode
) -> None:
    await client.hello()
    await client.send_event(login)
    reply = await client.read_event()
    assert isinstance(reply, ev.Error) and reply.request_id == 0, reply
    assert reply.code is code
    assert reply.message
    await victim.server.until_log("login_refused", peer=client.local_address, code=code.name)
    # The connection stays in the login phase: a good LOGIN on it now streams.
    ok = await client.login(GOOD)
    assert isinstance(ok, ev.LoginOk), ok
    data = await client.read(512, 512)
    assert isinstance(data, ev.ReadData) and bytes(data.data) == victim.images[GOOD][512:1024]
    await victim.still_serves()


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
async def test_bad_vdisk_name_is_refused(victim: Victim, client: RawClient, name: str) -> None:
    await _refused_then_served(victim, client, ev.Login("raw-target", name), ErrorCode.BAD_NAME)


@pytest.mark.parametrize("device_id", ["", "d" * 129], ids=["empty", "129 characters"])
async def test_bad_device_id_is_refused(victim: Victim, client: RawClient, device_id: str) -> None:
    await _refused_then_served(victim, client, ev.Login(device_id, GOOD), ErrorCode.BAD_NAME)


@pytest.mark.parametrize("name", ["nosuchdisk", "Good", "good.img"])
async def test_unknown_vdisk_is_refused(victim: Victim, client: RawClient, name: str) -> None:
    await _refused_then_served(
        victim, client, ev.Login("raw-target", name), ErrorCode.UNKNOWN_VDISK
    )


# -- silence and half frames: the handshake and idle timeouts -----------------------------------


@pytest.mark.parametrize(
    "step", ["nothing", "half a header", "HELLO only", "refused LOGIN", "streaming"]
)
async def test_silent_client_is_closed_after_the_timeout(impatient: Victim, step: str) -> None:
    client = await RawClient.connect(impatient.address)
    try:
        if step == "half a header":
            await client.send(frame(FrameType.HELLO, length=20)[:8])
        elif step == "HELLO only":
            await client.hello()
        elif step == "refused LOGIN":
            await client.hello()
            refused = await client.login("nosuchdisk")
            assert isinstance(refused, ev.Error), refused
        elif step == "streaming":
            await client.start(GOOD)
        goodbye = await client.expect_goodbye(timeout=15)
    finally:
        await client.close()
    assert goodbye is not None and goodbye.code == ErrorCode.TIMEOUT, goodbye
    event = "idle_timeout" if step == "streaming" else "handshake_timeout"
    await impatient.server.until_log(event, peer=client.local_address)
    await impatient.still_serves()


async def test_fragments_of_a_frame_do_not_keep_a_session_alive(impatient: Victim) -> None:
    """Idle timeout 1 s; the target sends one byte of a READ header every 0.2 s for 3 s,
    then the rest: the session must have been closed by then, and the READ left unanswered."""
    client = await RawClient.connect(impatient.address)
    events: list[ev.Event] = []
    try:
        await client.start(GOOD)
        request = read_frame_bytes(1, 0, 512)
        with ignore_disconnects():
            for index in range(15):
                await client.send(request[index : index + 1])
                await asyncio.sleep(0.2)
            await client.send(request[15:])
        events = await client.expect_closed(timeout=15)
    finally:
        await client.close()
    assert not any(isinstance(event, ev.ReadData) for event in events), events
    # The GOODBYE may be lost: our later bytes reach a closed socket, whose RST makes the
    # kernel drop what we had not read yet. The server's log says what happened either way.
    if events:
        assert isinstance(events[-1], ev.Goodbye) and events[-1].code == ErrorCode.TIMEOUT
    await impatient.server.until_log("idle_timeout", peer=client.local_address)
    await impatient.still_serves()


# -- clients that go away or flood -------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_that_disconnects_mid_reply(victim: Victim, how: str) -> None:
    client = await RawClient.connect(victim.address)
    try:
        await client.start(BIG, max_request=MIB)
        requests = b"".join(read_frame_bytes(i + 1, (i % 8) * MIB, MIB) for i in range(64))
        await client.send(requests)
    finally:
        await client.close(reset=how == "reset")
    await victim.server.until_log("target_disconnected", peer=client.local_address)
    await victim.still_serves()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("phase", ["hello", "streaming"])
async def test_flood_of_garbage(victim: Victim, client: RawClient, phase: str, seed: int) -> None:
    await _setup(client, phase)
    garbage = bytearray(random.Random(seed).randbytes(MIB))
    if garbage[:2] == struct.pack(">H", wire.MAGIC):
        garbage[0] ^= 0xFF
    with ignore_disconnects():
        client.writer.write(bytes(garbage))
        await client.writer.drain()
    try:
        goodbye = await client.expect_goodbye()
    except Closed:
        goodbye = None
    # With unread garbage in its buffer the server's close may become a reset that loses the
    # GOODBYE; if it arrives, it names the error.
    assert goodbye is None or goodbye.code == ErrorCode.MALFORMED, goodbye
    await victim.protocol_error_logged(client, ErrorCode.MALFORMED)
    await victim.still_serves()


async def test_frames_split_into_single_bytes_are_served(victim: Victim, client: RawClient) -> None:
    """TCP may cut frames anywhere: a target whose every byte arrives alone is served."""
    hello = encoded(ev.Hello(2, 2, MIB, frozenset(), "raw"))
    login = encoded(ev.Login("raw-target", GOOD))
    stream = [hello, login, read_frame_bytes(1, 0, 4096), read_frame_bytes(2, MIB, 512)]
    for data in stream:
        for index in range(len(data)):
            await client.send(data[index : index + 1])
    assert isinstance(await client.read_event(), ev.HelloReply)
    assert isinstance(await client.read_event(), ev.LoginOk)
    image = victim.images[GOOD]
    replies = {}
    for _ in range(2):
        event = await client.read_event()
        assert isinstance(event, ev.ReadData), event
        replies[event.request_id] = bytes(event.data)
    assert replies == {1: image[:4096], 2: image[MIB : MIB + 512]}
    await victim.still_serves()


async def test_hundreds_of_silent_connections_do_not_stop_service(victim: Victim) -> None:
    clients: list[RawClient] = []
    try:
        for _ in range(300):
            clients.append(await RawClient.connect(victim.address))
        await victim.still_serves()
    finally:
        for raw in clients:
            await raw.close(reset=True)


# -- requests in flight ---------------------------------------------------------------------------


async def test_max_in_flight_requests_pipelined_are_all_answered(narrow: Victim) -> None:
    client = await RawClient.connect(narrow.address)
    try:
        reply = await client.hello(max_request=MIB)
        assert reply.max_in_flight == 4
        assert isinstance(await client.login(BIG), ev.LoginOk)
        await client.send(b"".join(read_frame_bytes(i, i * MIB, MIB) for i in range(1, 5)))
        answers = {}
        for _ in range(4):
            event = await client.read_event()
            assert isinstance(event, ev.ReadData), event
            answers[event.request_id] = bytes(event.data)
    finally:
        await client.close()
    image = narrow.images[BIG]
    assert answers == {i: image[i * MIB : (i + 1) * MIB] for i in range(1, 5)}
    await narrow.still_serves()


def _evict_from_page_cache(path: Path) -> None:
    """So that the server's reads wait on the disk and stay in flight (no-op on tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_more_than_max_in_flight_requests(narrow: Victim) -> None:
    """16 requests pipelined where 4 are allowed: the server may answer requests as they come
    (then it never has more than 4 outstanding) or end the connection with TOO_LARGE, but every
    answer it gives is right, and it keeps serving others."""
    image = narrow.images[BIG]
    count = 16
    client = await RawClient.connect(narrow.address)
    try:
        await client.start(BIG, max_request=MIB // 2)
        _evict_from_page_cache(image_path(narrow.server.stores[0], BIG))
        offsets = {i: (i - 1) * MIB // 2 for i in range(1, count + 1)}
        with ignore_disconnects():
            await client.send(
                b"".join(read_frame_bytes(i, offsets[i], MIB // 2) for i in offsets)
            )
        answers: dict[int, bytes] = {}
        goodbye: ev.Goodbye | None = None
        for _ in range(count + 1):
            try:
                event = await client.read_event()
            except Closed:
                break
            if isinstance(event, ev.Goodbye):
                goodbye = event
                break
            assert isinstance(event, ev.ReadData), event
            answers[event.request_id] = bytes(event.data)
            if len(answers) == count:
                break
    finally:
        await client.close()
    for request_id, data in answers.items():
        assert data == image[offsets[request_id] : offsets[request_id] + MIB // 2]
    if len(answers) < count:
        assert goodbye is not None and goodbye.code == ErrorCode.TOO_LARGE, (goodbye, answers)
        await narrow.protocol_error_logged(client, ErrorCode.TOO_LARGE)
    await narrow.still_serves()


async def test_target_that_does_not_read_cannot_make_the_server_buffer_without_bound(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    make_vdisk(store, BIG, 8 * MIB, seed=32)
    image = image_path(store, BIG).read_bytes()
    server = pvsd_factory(
        "slowpoke", store, vdisks=[BIG], args=["--max-in-flight", "4", "--max-request", str(MIB)]
    )
    before_kib = process_memory_kib(server.pid, "VmRSS")
    count = 200
    client = await RawClient.connect(server.address)
    try:
        await client.start(BIG, max_request=MIB)
        await client.send(
            b"".join(read_frame_bytes(i + 1, (i % 8) * MIB, MIB) for i in range(count))
        )
        answered = 0
        for _ in range(count):  # read only now: a slow target
            try:
                event = await client.read_event()
            except Closed:
                break
            if not isinstance(event, ev.ReadData):
                assert isinstance(event, ev.Goodbye) and event.code == ErrorCode.TOO_LARGE, event
                break
            offset = ((event.request_id - 1) % 8) * MIB
            assert bytes(event.data) == image[offset : offset + MIB]
            answered += 1
    finally:
        await client.close()
    # Allowed: max_in_flight requests plus the write buffer's high-water mark (4 x max_request),
    # with room to spare; a server that buffers every reply grows by count x 1 MiB.
    growth_mib = (process_memory_kib(server.pid, "VmHWM") - before_kib) / 1024
    assert growth_mib < 48, f"{answered} replies; peak memory grew {growth_mib:.0f} MiB"
