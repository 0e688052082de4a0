"""A server that sends wrong bytes cannot get them past the target: real sockets, fake servers.

Each fake server listens on 127.0.0.1 and speaks through the same sans-IO ``Connection`` as
pvsd (``Role.SERVER``), serving an image from memory with its real manifest (READ, DIGESTS).
The bad one flips a byte of one block and sends it with a valid CRC-32 (the state machine
computes it over the wrong data), or negotiates no checksum at all. The target reads through
``VDiskStream`` and must get only good bytes, tell the bad server (DAMAGED, then GOODBYE),
drop it and fail over to the good one.

(pvsd does not answer DIGESTS yet while this is written: both servers are fakes.)
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import Connection, Role, negotiate
from pvs_protocol.errors import ErrorCode, ProtocolError
from pvs_protocol.manifest import Manifest, hash_blocks
from pvs_protocol.modes import Mode
from pvs_target.failover import FailoverSettings, VDiskStream
from pvs_target.verify import BlockMismatch

BLOCK = 16384
IMAGE = random.Random(10).randbytes(3 * 1024 * 1024 + 1234)  # two leaf pages, a short block
MANIFEST = Manifest.build(
    7, 1_790_000_000_000_000_000, len(IMAGE), BLOCK, b"".join(hash_blocks(IMAGE, BLOCK))
)
BAD_BLOCK = 5
TIMEOUT = 10.0


class FakeServer:
    def __init__(self, name: str, *, corrupt: frozenset[int] = frozenset(),
                 checksum: bool = True) -> None:
        self.name = name
        self.corrupt = corrupt
        self.checksum = checksum
        self.address = ""
        self.site: tuple[str, ...] = ()
        self.received: list[ev.Event] = []
        self.changed = asyncio.Condition()
        self._writers: list[asyncio.StreamWriter] = []

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for writer in self._writers:
                writer.close()
            await server.wait_closed()

    def of(self, kind: type) -> list[ev.Event]:
        return [event for event in self.received if isinstance(event, kind)]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT), self.changed:
            await self.changed.wait_for(predicate)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        connection = Connection(Role.SERVER)
        try:
            while data := await reader.read(1 << 16):
                connection.receive_data(data)
                while not isinstance(event := connection.next_event(), ev.NeedData):
                    async with self.changed:
                        self.received.append(event)
                        self.changed.notify_all()
                    reply = self._answer(event)
                    if reply is not None:
                        buffers = connection.send_buffers(reply)
                        if self.checksum and isinstance(reply, ev.ReadData):
                            # a valid CRC-32 over what it sends, wrong bytes included (the
                            # target ignores the field of a read-only session: no help)
                            buffers = wire.encode(reply, ev.Checksum.CRC32)
                        writer.writelines(buffers)
        except (ConnectionError, ProtocolError):
            pass
        finally:
            writer.close()

    def _answer(self, event: ev.Event) -> ev.Event | None:
        match event:
            case ev.Hello():
                return negotiate(
                    event, max_request=1 << 20, max_in_flight=16, server_name=self.name,
                    checksum=self.checksum,
                )
            case ev.Login():
                return ev.LoginOk(
                    1, MANIFEST.identity, BLOCK, Mode.standard.code,
                    ev.LoginFlag.READ_ONLY | ev.LoginFlag.FAILOVER, self.name, self.address,
                    self.site,
                )
            case ev.Read(request_id, offset, length):
                data = bytearray(IMAGE[offset : offset + length])
                for block in self.corrupt:
                    at = block * BLOCK + 100 - offset
                    if 0 <= at < length:
                        data[at] ^= 0xFF  # the CRC is computed over this, so it is valid
                return ev.ReadData(request_id, data)
            case ev.Digests(request_id, level, page, _length):
                return ev.ReadData(request_id, MANIFEST.page(level, page))
            case ev.Keepalive(token, reply=False):
                return ev.Keepalive(token, reply=True)
        return None


@asynccontextmanager
async def bad_and_good(*, checksum: bool) -> AsyncIterator[tuple[FakeServer, FakeServer]]:
    bad = FakeServer("bad", corrupt=frozenset({BAD_BLOCK}), checksum=checksum)
    good = FakeServer("good")
    async with bad.running(), good.running():
        bad.site, good.site = (good.address,), (bad.address,)
        yield bad, good


@asynccontextmanager
async def stream_from(*servers: FakeServer) -> AsyncIterator[VDiskStream]:
    settings = FailoverSettings(dead_after=5.0, connect_timeout=2.0)
    stream = VDiskStream([server.address for server in servers], "win10", "lab-pc-07",
                         settings=settings)
    await stream.open()
    try:
        yield stream
    finally:
        await stream.close()


async def assert_told_and_dropped(bad: FakeServer, good: FakeServer, stream: VDiskStream) -> None:
    """DAMAGED for the bad block, then GOODBYE; the stream now on the good server, the bad
    one dropped and avoided at the next login."""
    await bad.wait_for(lambda: bool(bad.of(ev.Goodbye)))
    damaged = bad.of(ev.Damaged)
    assert [report.block for report in damaged if isinstance(report, ev.Damaged)] == [BAD_BLOCK]
    assert bad.received.index(damaged[0]) < bad.received.index(bad.of(ev.Goodbye)[0])
    goodbye = bad.of(ev.Goodbye)[0]
    assert isinstance(goodbye, ev.Goodbye) and goodbye.code == ErrorCode.NO_IDENTICAL_REPLICA
    session = stream.session
    assert session is not None and session.server_name == "good"
    logins = good.of(ev.Login)
    assert logins and isinstance(logins[-1], ev.Login)
    assert logins[-1].avoid == "bad" and logins[-1].pinned == MANIFEST.identity
    status = stream.status()["verification"]
    assert status["dropped_servers"] == [{"name": "bad", "address": bad.address}]
    assert [(m["server"], m["block"]) for m in status["mismatches"]] == [("bad", BAD_BLOCK)]
    assert stream.history[-1].from_server == "bad" and stream.history[-1].to_server == "good"


@pytest.mark.parametrize("checksum", [True, False], ids=["valid-crc", "no-checksum"])
async def test_wrong_bytes_are_never_delivered_and_the_target_fails_over(checksum: bool) -> None:
    async with (
        asyncio.timeout(TIMEOUT),
        bad_and_good(checksum=checksum) as (bad, good),
        stream_from(bad, good) as stream,
    ):
        assert stream.session is not None and stream.session.server_name == "bad"
        # read-only: from LOGIN_OK on, no checksum whatever HELLO agreed; the manifest decides
        assert stream.session.connection.checksum is ev.Checksum.NONE
        data = await stream.read(0, len(IMAGE))
        assert data == IMAGE
        await assert_told_and_dropped(bad, good, stream)
        # unaligned reads across the bad block, now from the good server
        at = BAD_BLOCK * BLOCK - 7
        assert await stream.read(at, BLOCK + 20) == IMAGE[at : at + BLOCK + 20]
        status = stream.status()["verification"]
        assert status["blocks_checked"] >= MANIFEST.shape.blocks
        assert status["pages_fetched"] >= 3  # the top page and two leaf pages


async def test_the_fast_path_checks_in_the_callback_and_hands_failures_back() -> None:
    async with (
        asyncio.timeout(TIMEOUT),
        bad_and_good(checksum=True) as (bad, good),
        stream_from(bad, good) as stream,
    ):
        assert await stream.read(0, 100) == IMAGE[:100]  # learns leaf page 0
        answers: asyncio.Queue[object] = asyncio.Queue()
        # not known yet (leaf page 1): the coroutine path must take it
        assert not stream.read_now(200 * BLOCK, 10, answers.put_nowait)
        assert stream.read_now(BLOCK, 4 * BLOCK, answers.put_nowait)  # aligned: no copy
        assert await answers.get() == IMAGE[BLOCK : 5 * BLOCK]
        at = BAD_BLOCK * BLOCK + 50
        assert stream.read_now(at, 100, answers.put_nowait)
        failure = await answers.get()
        assert isinstance(failure, BlockMismatch) and failure.block == BAD_BLOCK
        # what the export does with a failed fast read: ``read``, which fails over
        assert await stream.read(at, 100) == IMAGE[at : at + 100]
        await assert_told_and_dropped(bad, good, stream)
        assert stream.read_now(at, 100, answers.put_nowait)
        assert await answers.get() == IMAGE[at : at + 100]


async def test_the_dropped_server_is_never_logged_in_to_again() -> None:
    async with (
        asyncio.timeout(TIMEOUT),
        bad_and_good(checksum=True) as (bad, good),
        stream_from(bad, good) as stream,
    ):
        await stream.read(BAD_BLOCK * BLOCK, 10)
        await assert_told_and_dropped(bad, good, stream)
        logins_at_bad = len(bad.of(ev.Login))
        session = stream.session
        assert session is not None
        session.connection.abort()  # the good server is lost: only it is left to try
        assert await stream.read(0, 10) == IMAGE[:10]
        assert stream.session is not None and stream.session.server_name == "good"
        assert len(bad.of(ev.Login)) == logins_at_bad


def test_the_same_under_uvloop() -> None:
    """uvloop gathers writes until the end of a loop turn: DAMAGED must still leave before
    the connection closes."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_wrong_bytes_are_never_delivered_and_the_target_fails_over(True))
        runner.run(test_the_fast_path_checks_in_the_callback_and_hands_failures_back())
