"""The target client against scripted servers on 127.0.0.1.

Each server is a real listening socket speaking through the same sans-IO ``Connection`` the
real server uses (``Role.SERVER``), with its answers scripted per test: this checks the client
against the protocol's rules, bytes on a socket included, without needing pvsd.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import queue
import random
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import pytest
import structlog

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import Connection, Role, negotiate
from pvs_protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.manifest import Manifest, hash_blocks
from pvs_target.__main__ import main
from pvs_target.client import (
    ConnectionLost,
    LoginError,
    ServerError,
    Session,
    login,
    read_range,
)

CONTENT = random.Random(7).randbytes(300_000 + 123)
MANIFEST = Manifest.build(
    3, 1_700_000_000_000_000_000, len(CONTENT), 16384,
    b"".join(hash_blocks(CONTENT, 16384)),
)
IDENTITY = MANIFEST.identity
TIMEOUT = 5.0


class Peer:
    """The server's side of one accepted connection."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.connection = Connection(Role.SERVER)
        self.writer = writer
        self.most_in_flight = 0

    def send(self, event: ev.Event) -> None:
        try:
            self.writer.write(self.connection.send(event))
        except LocalProtocolError:
            # Play a buggy server: put on the wire what our own state machine refuses to send.
            self.writer.write(b"".join(wire.encode(event, self.connection.checksum)))

    def data(self, read: ev.Read) -> ev.ReadData:
        return ev.ReadData(read.request_id, CONTENT[read.offset : read.offset + read.length])


Script = Callable[[Peer, ev.Event], Awaitable[None] | None]


async def answer_normally(peer: Peer, event: ev.Event) -> None:
    match event:
        case ev.Read(request_id, offset, length) if offset + length > len(CONTENT):
            peer.send(ev.Error(request_id, ErrorCode.OUT_OF_RANGE, "past the end"))
        case ev.Read():
            peer.send(peer.data(event))
        case ev.Write(request_id):
            peer.send(ev.Error(request_id, ErrorCode.READ_ONLY, "Standard Image"))
        case ev.Flush(request_id):
            peer.send(ev.Done(request_id))


class ScriptedServer:
    def __init__(
        self,
        name: str = "pvs1",
        *,
        login_reply: Callable[[ev.Login], ev.Event | None] | None = None,
        script: Script = answer_normally,
        max_in_flight: int = 16,
    ) -> None:
        self.name = name
        self.login_reply = login_reply or self.accept
        self.script = script
        self.max_in_flight = max_in_flight
        self.received: list[ev.Event] = []
        self.arrived = asyncio.Condition()
        self.peers: list[Peer] = []
        self.address = ""
        self._tasks: set[asyncio.Task[None]] = set()

    def accept(self, login: ev.Login) -> ev.Event:
        return ev.LoginOk(42, IDENTITY, 4096, 1, ev.LoginFlag.READ_ONLY, self.name, self.address)

    @property
    def logins(self) -> list[ev.Login]:
        return [event for event in self.received if isinstance(event, ev.Login)]

    async def wait_for(self, predicate: Callable[[ev.Event], bool]) -> ev.Event:
        async with self.arrived:
            await self.arrived.wait_for(lambda: any(map(predicate, self.received)))
        return next(event for event in self.received if predicate(event))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedServer]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            for peer in self.peers:
                peer.writer.close()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(writer)
        self.peers.append(peer)
        try:
            while data := await reader.read(1 << 16):
                peer.connection.receive_data(data)
                while not isinstance(event := peer.connection.next_event(), ev.NeedData):
                    peer.most_in_flight = max(peer.most_in_flight, peer.connection.outstanding)
                    async with self.arrived:
                        self.received.append(event)
                        self.arrived.notify_all()
                    await self._dispatch(peer, event)
        except (ConnectionError, ProtocolError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, peer: Peer, event: ev.Event) -> None:
        match event:
            case ev.Hello():
                reply = negotiate(
                    event, max_request=128 * 1024, max_in_flight=self.max_in_flight,
                    server_name=self.name,
                )
                peer.send(reply)
            case ev.Login():
                answer = self.login_reply(event)
                if answer is not None:
                    peer.send(answer)
            case ev.Keepalive(token, reply=False):
                peer.send(ev.Keepalive(token, reply=True))
            case ev.Digests(request_id, level, page, _length):
                peer.send(ev.ReadData(request_id, MANIFEST.page(level, page)))
            case ev.Read() | ev.Write() | ev.Flush():
                result = self.script(peer, event)
                if result is not None:
                    await result


@asynccontextmanager
async def servers(*scripted: ScriptedServer) -> AsyncIterator[list[str]]:
    async with AsyncExitStack() as stack:
        for server in scripted:
            await stack.enter_async_context(server.running())
        yield [server.address for server in scripted]


@asynccontextmanager
async def session_with(server: ScriptedServer, **options: object) -> AsyncIterator[Session]:
    async with server.running():
        session = await login([server.address], "win10", "lab-pc-07", **options)  # type: ignore[arg-type]
        try:
            yield session
        finally:
            await session.close()


def redirect_to(target: ScriptedServer) -> Callable[[ev.Login], ev.Event]:
    return lambda _login: ev.Redirect(target.name, target.address, "balance")


def refuse(code: ErrorCode) -> Callable[[ev.Login], ev.Event]:
    return lambda _login: ev.Error(0, code, "scripted refusal")


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- login ------------------------------------------------------------------------------------


async def test_login_reports_the_stream_and_reads() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        assert session.identity == IDENTITY
        assert session.size == len(CONTENT)
        assert (session.session_id, session.block_size, session.mode) == (42, 4096, 1)
        assert session.read_only
        assert session.server_name == "pvs1"
        assert session.connected_to == session.login_server == session.server_address
        assert not session.redirected
        # CRC32 was agreed, but a read-only session's blocks are checked against the manifest
        assert session.connection.checksum is ev.Checksum.NONE
        assert session.max_request == 128 * 1024  # the server's limit is below our wish
        assert await session.connection.read(1000, 4096) == CONTENT[1000:5096]


async def test_hello_offers_what_was_asked() -> None:
    server = ScriptedServer()
    async with asyncio.timeout(TIMEOUT), session_with(server, checksum=False, max_request=8192):
        hello = next(event for event in server.received if isinstance(event, ev.Hello))
        assert hello == ev.Hello(wire.VERSION, wire.VERSION, 8192, frozenset(), "pvs-target/0.1")
        assert server.logins == [ev.Login("lab-pc-07", "win10", None, False)]


async def test_without_checksum_reads_still_work() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer(), checksum=False) as session:
        assert session.connection.checksum is ev.Checksum.NONE
        assert await session.connection.read(0, 100) == CONTENT[:100]


async def test_redirect_is_followed_once() -> None:
    streamer = ScriptedServer("pvs2")
    login_server = ScriptedServer("pvs1", login_reply=lambda _: None)
    async with asyncio.timeout(TIMEOUT), servers(streamer, login_server):
        login_server.login_reply = redirect_to(streamer)
        session = await login([login_server.address], "win10", "lab-pc-07")
        try:
            assert session.connected_to == streamer.address
            assert session.login_server == login_server.address
            assert session.redirected
            assert session.server_name == "pvs2"
            assert login_server.logins == [ev.Login("lab-pc-07", "win10", None, False)]
            assert streamer.logins == [ev.Login("lab-pc-07", "win10", None, True)]
            assert await session.connection.read(0, 10) == CONTENT[:10]
        finally:
            await session.close()


async def test_a_redirected_login_redirected_again_fails() -> None:
    third = ScriptedServer("pvs3")
    second = ScriptedServer("pvs2")
    first = ScriptedServer("pvs1")
    async with asyncio.timeout(TIMEOUT), servers(third, second, first):
        second.login_reply = redirect_to(third)
        first.login_reply = redirect_to(second)
        with pytest.raises(LoginError, match="redirect loop") as raised:
            await login([first.address], "win10", "lab-pc-07")
        assert raised.value.code is ErrorCode.BAD_STATE
        assert third.logins == []


async def test_unreachable_server_is_skipped() -> None:
    server = ScriptedServer()
    dead = f"127.0.0.1:{unused_port()}"
    async with asyncio.timeout(TIMEOUT), servers(server):
        session = await login([dead, server.address], "win10", "lab-pc-07", connect_timeout=1)
        assert session.login_server == server.address
        await session.close()


async def test_all_unreachable_is_a_login_error() -> None:
    dead = [f"127.0.0.1:{unused_port()}", f"127.0.0.1:{unused_port()}"]
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(LoginError, match="cannot connect") as raised:
            await login(dead, "win10", "lab-pc-07", connect_timeout=1)
    assert raised.value.code is None
    assert raised.value.retryable
    assert all(address in str(raised.value) for address in dead)


async def test_retryable_refusal_moves_to_the_next_server() -> None:
    busy = ScriptedServer("pvs1", login_reply=refuse(ErrorCode.IDENTITY_PENDING))
    ready = ScriptedServer("pvs2")
    async with asyncio.timeout(TIMEOUT), servers(busy, ready):
        session = await login([busy.address, ready.address], "win10", "lab-pc-07")
        assert session.server_name == "pvs2"
        await session.close()


async def test_final_refusal_stops_at_once() -> None:
    unknown = ScriptedServer("pvs1", login_reply=refuse(ErrorCode.UNKNOWN_VDISK))
    other = ScriptedServer("pvs2")
    async with asyncio.timeout(TIMEOUT), servers(unknown, other):
        with pytest.raises(LoginError, match="check the vDisk name") as raised:
            await login([unknown.address, other.address], "win10", "lab-pc-07")
    assert raised.value.code is ErrorCode.UNKNOWN_VDISK
    assert raised.value.server == unknown.address
    assert not raised.value.retryable
    assert other.logins == []


async def test_silent_server_times_out() -> None:
    silent = ScriptedServer(login_reply=lambda _: None)
    async with asyncio.timeout(TIMEOUT), servers(silent):
        with pytest.raises(LoginError, match="did not answer"):
            await login([silent.address], "win10", "lab-pc-07", connect_timeout=0.2)
        goodbye = await silent.wait_for(lambda event: isinstance(event, ev.Goodbye))
        assert goodbye == ev.Goodbye(ErrorCode.TIMEOUT, "no answer to login")


async def test_pinned_identity_must_match() -> None:
    other = ReplicaIdentity(4, IDENTITY.timestamp_ns, IDENTITY.size, IDENTITY.digest)
    async with asyncio.timeout(TIMEOUT), servers(ScriptedServer()) as addresses:
        with pytest.raises(LoginError, match="differing in version"):
            await login(addresses, "win10", "lab-pc-07", pinned=other)


async def test_goodbye_at_login_is_a_login_error() -> None:
    def stopping(_login: ev.Login) -> None:
        server.peers[-1].send(ev.Goodbye(ErrorCode.STOPPING, "shutting down"))

    server = ScriptedServer(login_reply=stopping)
    async with asyncio.timeout(TIMEOUT), servers(server):
        with pytest.raises(LoginError, match="shutting down") as raised:
            await login([server.address], "win10", "lab-pc-07")
    assert raised.value.code is ErrorCode.STOPPING


# -- streaming --------------------------------------------------------------------------------


async def test_pipelined_replies_in_reverse_land_on_their_futures() -> None:
    held: list[ev.Read] = []

    def reverse(peer: Peer, event: ev.Event) -> None:
        assert isinstance(event, ev.Read)
        held.append(event)
        if len(held) == 8:
            for read in reversed(held):
                peer.send(peer.data(read))

    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer(script=reverse)) as session:
        offsets = [i * 10_000 + 3 for i in range(8)]
        results = await asyncio.gather(*(session.connection.read(at, 777) for at in offsets))
        assert results == [CONTENT[at : at + 777] for at in offsets]


async def test_never_more_in_flight_than_the_server_allows() -> None:
    server = ScriptedServer(max_in_flight=3)
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        reads = [session.connection.read(at * 100, 100) for at in range(40)]
        expected = [CONTENT[at * 100 : at * 100 + 100] for at in range(40)]
        assert await asyncio.gather(*reads) == expected
        assert server.peers[0].most_in_flight <= 3


async def test_a_cancelled_read_keeps_its_slot_until_answered() -> None:
    held: list[ev.Read] = []

    def hold_first(peer: Peer, event: ev.Event) -> None:
        assert isinstance(event, ev.Read)
        if held:
            peer.send(peer.data(event))
        else:
            held.append(event)

    server = ScriptedServer(script=hold_first, max_in_flight=1)
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await session.connection.read(0, 10)
        # The server still owes that reply, so the one slot stays taken: a new read waits
        # rather than break max_in_flight=1 (the server's state machine would refuse it).
        second = asyncio.create_task(session.connection.read(10, 10))
        await asyncio.sleep(0.05)
        assert not second.done()
        assert len([event for event in server.received if isinstance(event, ev.Read)]) == 1
        server.peers[0].send(server.peers[0].data(held[0]))
        assert await second == CONTENT[10:20]
        assert server.peers[0].most_in_flight == 1


async def test_server_closing_mid_reply_fails_pending_reads() -> None:
    def half_then_close(peer: Peer, event: ev.Event) -> None:
        assert isinstance(event, ev.Read)
        frame = b"".join(peer.connection.send_buffers(peer.data(event)))
        peer.writer.write(frame[: len(frame) // 2])
        peer.writer.close()

    server = ScriptedServer(script=half_then_close)
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        results = await asyncio.gather(
            *(session.connection.read(at, 4096) for at in (0, 4096, 8192)), return_exceptions=True
        )
        assert all(isinstance(result, ConnectionLost) for result in results)
        with pytest.raises(ConnectionLost):
            await session.connection.read(0, 1)
        assert not session.connection.is_open


async def test_goodbye_fails_pending_reads_with_its_code() -> None:
    def goodbye(peer: Peer, event: ev.Event) -> None:
        peer.send(ev.Goodbye(ErrorCode.STOPPING, "maintenance"))

    server = ScriptedServer(script=goodbye, max_in_flight=2)
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        # Two reads are sent, eight wait for a slot: all ten must fail, none may hang.
        results = await asyncio.gather(
            *(session.connection.read(at, 10) for at in range(10)), return_exceptions=True
        )
        assert all(isinstance(result, ConnectionLost) for result in results)
        first = results[0]
        assert isinstance(first, ConnectionLost)
        assert first.code is ErrorCode.STOPPING
        assert "STOPPING: maintenance" in str(first)
        assert session.connection.goodbye == ev.Goodbye(ErrorCode.STOPPING, "maintenance")


async def test_error_reply_is_a_server_error_and_the_connection_goes_on() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        with pytest.raises(ServerError, match="OUT_OF_RANGE") as raised:
            await session.connection.read(len(CONTENT) - 10, 20)
        assert raised.value.code is ErrorCode.OUT_OF_RANGE
        assert not raised.value.retryable
        assert await session.connection.read(len(CONTENT) - 10, 10) == CONTENT[-10:]


async def test_write_to_standard_image_is_refused_and_flush_is_done() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        with pytest.raises(ServerError) as raised:
            await session.connection.write(0, b"x" * 512)
        assert raised.value.code is ErrorCode.READ_ONLY
        await session.connection.flush()


async def test_corrupted_data_ends_the_connection_with_goodbye() -> None:
    def corrupt(peer: Peer, event: ev.Event) -> None:
        assert isinstance(event, ev.Read)
        peer.connection.send(peer.data(event))  # keep the server's state machine in step
        payload = struct.pack(">I", 0xDEADBEEF) + CONTENT[: event.length]
        header = wire.header(wire.FrameType.READ_DATA, len(payload), event.request_id)
        peer.writer.write(header + payload)

    def private(login: ev.Login) -> ev.Event:  # read-only sessions carry no CRC
        return ev.LoginOk(42, IDENTITY, 4096, 2, ev.LoginFlag(0), "pvs1", "x:1")

    server = ScriptedServer(script=corrupt, login_reply=private)
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        with pytest.raises(ConnectionLost, match="checksum mismatch") as raised:
            await session.connection.read(0, 100)
        assert raised.value.code is ErrorCode.CHECKSUM
        assert raised.value.code.retryable  # damage on the way: a new connection may succeed
        goodbye = await server.wait_for(lambda event: isinstance(event, ev.Goodbye))
        assert isinstance(goodbye, ev.Goodbye) and goodbye.code == ErrorCode.CHECKSUM


async def test_server_keepalive_is_answered_and_ping_measures() -> None:
    server = ScriptedServer()
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        server.peers[0].send(ev.Keepalive(99))
        await server.wait_for(lambda event: event == ev.Keepalive(99, reply=True))
        seconds = await session.connection.ping()
        assert 0 < seconds < TIMEOUT


async def test_relogin_notice_is_recorded() -> None:
    server = ScriptedServer()
    notices: list[ev.Relogin] = []
    async with asyncio.timeout(TIMEOUT), session_with(server) as session:
        session.connection.on_relogin = notices.append
        server.peers[0].send(ev.Relogin(5000, "draining"))
        await session.connection.relogin.wait()
        assert session.connection.relogin_notice == ev.Relogin(5000, "draining")
        assert notices == [ev.Relogin(5000, "draining")]
        assert await session.connection.read(0, 10) == CONTENT[:10]  # still served


async def test_close_says_goodbye() -> None:
    server = ScriptedServer()
    async with asyncio.timeout(TIMEOUT), servers(server):
        session = await login([server.address], "win10", "lab-pc-07")
        await session.close()
        assert await server.wait_for(lambda event: isinstance(event, ev.Goodbye)) == ev.Goodbye(
            0, ""
        )
        with pytest.raises(ConnectionLost, match="closed by the target"):
            await session.connection.read(0, 1)


async def test_requests_are_checked_before_sending() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        with pytest.raises(ValueError, match="outside"):
            await session.connection.read(0, session.max_request + 1)
        with pytest.raises(ValueError, match="negative"):
            await session.connection.read(-1, 1)
        assert await session.connection.read(0, 1) == CONTENT[:1]


# -- read_range -------------------------------------------------------------------------------


async def test_read_range_returns_the_whole_range() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        assert await read_range(session, 0, session.size) == CONTENT
        assert await read_range(session, 5, 0) == b""


async def test_read_range_delivers_in_order_when_replies_are_shuffled() -> None:
    held: list[ev.Read] = []
    shuffle = random.Random(3)

    def shuffled(peer: Peer, event: ev.Event) -> None:
        assert isinstance(event, ev.Read)
        held.append(event)
        if len(held) == 4 or event.offset + event.length == len(CONTENT):
            shuffle.shuffle(held)
            for read in held:
                peer.send(peer.data(read))
            held.clear()

    chunks: list[tuple[int, bytes | bytearray]] = []
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer(script=shuffled)) as session:
        result = await read_range(
            session, 0, session.size, chunk=10_000, depth=4,
            sink=lambda at, data: chunks.append((at, data)),
        )
    assert result is None
    assert [at for at, _ in chunks] == list(range(0, len(CONTENT), 10_000))
    assert b"".join(data for _, data in chunks) == CONTENT


async def test_read_range_awaits_an_async_sink() -> None:
    seen: list[int] = []

    async def slow_sink(at: int, data: bytes | bytearray) -> None:
        await asyncio.sleep(0)
        seen.append(at)

    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        await read_range(session, 0, 100_000, chunk=30_000, sink=slow_sink)
    assert seen == [0, 30_000, 60_000, 90_000]


async def test_read_range_raises_the_first_failure_and_leaves_nothing_running() -> None:
    async with asyncio.timeout(TIMEOUT), session_with(ScriptedServer()) as session:
        with pytest.raises(ServerError, match="OUT_OF_RANGE"):
            await read_range(session, 0, session.size + 50_000, chunk=50_000, depth=8)
        await asyncio.sleep(0.01)
        assert session.connection.in_flight == 0
        reads = [
            task for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "StreamConnection.read"
        ]
        assert reads == []


# -- the same core paths under uvloop ------------------------------------------------------------


async def _core_paths() -> None:
    await test_login_reports_the_stream_and_reads()
    await test_redirect_is_followed_once()
    await test_pipelined_replies_in_reverse_land_on_their_futures()
    await test_server_closing_mid_reply_fails_pending_reads()
    await test_read_range_returns_the_whole_range()


def test_core_paths_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_core_paths())


# -- the pvs-target read command --------------------------------------------------------------


@contextmanager
def server_in_thread(**options: Any) -> Iterator[str]:
    """A scripted server on its own loop and thread, for the command's own loop to talk to."""
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    async def serve() -> None:
        server = ScriptedServer(**options)
        async with server.running():
            ready.put(server.address)
            while not stop.is_set():
                await asyncio.sleep(0.01)

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        yield ready.get(timeout=TIMEOUT)
    finally:
        stop.set()
        thread.join(TIMEOUT)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_read_command_copies_and_verifies(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "win10.img"
    with server_in_thread() as address:
        code = main(
            ["read", "--server", address, "--vdisk", "win10", "-o", str(image), "--json",
             "--depth", "4", "--chunk", "64K"]
        )
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["verified"] is True
    assert report["sha256"] == hashlib.sha256(CONTENT).hexdigest()
    assert report["manifest"] == {
        "root": IDENTITY.digest.hex(), "version": 3, "created_ns": IDENTITY.timestamp_ns,
        "block_size": 16384,
    }
    assert report["verification"]["blocks_checked"] == MANIFEST.shape.blocks
    assert report["verification"]["mismatches"] == []
    assert report["bytes"] == len(CONTENT)
    assert report["server"]["address"] == address
    assert report["chunk"] == 64 * 1024
    assert image.read_bytes() == CONTENT


@pytest.mark.usefixtures("restore_logging")
def test_read_command_reports_a_mismatch(capsys: pytest.CaptureFixture[str]) -> None:
    """A server whose manifest does not lead to the root it announced: nothing is kept,
    the server is told, and with no other server the command fails with status 1."""
    wrong = ReplicaIdentity(
        IDENTITY.version, IDENTITY.timestamp_ns, IDENTITY.size, bytes(32), IDENTITY.block_size
    )

    def liar(login: ev.Login) -> ev.Event:
        return ev.LoginOk(1, wrong, 4096, 1, ev.LoginFlag.READ_ONLY, "pvs1", "x:1")

    with server_in_thread(login_reply=liar) as address:
        code = main(["read", "--server", address, "--vdisk", "win10", "--no-checksum"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert "does not match the manifest" in captured.err
    assert "no other server" in captured.err


@pytest.mark.usefixtures("restore_logging")
def test_read_command_prints_the_manifest_and_verified(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with server_in_thread() as address:
        code = main(["read", "--server", address, "--vdisk", "win10", "--chunk", "100K"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"manifest root {IDENTITY.digest.hex()}" in out
    assert "block size 16384" in out and "created 2023-11-14T22:13:20Z" in out
    assert f"checked   {MANIFEST.shape.blocks} blocks" in out
    assert "verified: true" in out


@pytest.mark.usefixtures("restore_logging")
def test_read_command_failure_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"127.0.0.1:{unused_port()}"
    code = main(["read", "--server", dead, "--vdisk", "win10", "--connect-timeout", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.startswith("pvs-target:")]
    assert len(errors) == 1 and "cannot connect" in errors[0]
    assert "Traceback" not in captured.err


def test_read_command_rejects_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["read", "--server", "::1:6910", "--vdisk", "win10"])
    assert raised.value.code == 2
    assert "in brackets" in capsys.readouterr().err
