"""Real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio, nbdfuse) against ``serve_nbd``.

The server runs on an event loop owned by a thread of the test process (uvloop and asyncio),
over small backends defined here: a read-only file, and a write cache over that file. Each test
that needs a tool skips cleanly when the tool is missing. Processes are started here and only
ever signalled by their own PID.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog
from nbd_tools import need, run

from pvs_target.cache import WriteCache
from pvs_target.nbd import wire
from pvs_target.nbd.server import BackendError, NbdServer, serve_nbd
from pvs_target.nbd.wire import CommandKind

pytestmark = pytest.mark.external

SIZE = 32 * 1024 * 1024
EXPORT = "disk"
T = TypeVar("T")


# -- backends -----------------------------------------------------------------------------


class FileBackend:
    """The file itself, read-only: what the streamed vDisk looks like to the export."""

    block_size = 4096
    multi_conn = True

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.read_only = True
        self.delay = 0.0
        self.fail_reads = False
        self.reading = 0
        self.most_reading = 0

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self.reading += 1
        self.most_reading = max(self.most_reading, self.reading)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.reading -= 1
        if self.fail_reads:
            raise RuntimeError("the backend exploded")
        return os.pread(self.fd, length, offset)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        raise BackendError(errno.EROFS, "read-only")

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int) -> None:
        raise BackendError(errno.EROFS, "read-only")

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        raise BackendError(errno.EROFS, "read-only")


class CachedBackend(FileBackend):
    """Standard Image mode: writes go to a WriteCache over the read-only file."""

    fast_zero = True

    def __init__(self, path: Path, cache: WriteCache) -> None:
        super().__init__(path)
        self.read_only = False
        self.cache = cache

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self.cache.read(offset, length, super().read)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool) -> None:
        self.cache.write(offset, data)

    async def trim(self, offset: int, length: int) -> None:
        self.cache.trim(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        self.cache.zero(offset, length)


# -- a server on a thread's loop ------------------------------------------------------------


class ThreadServer:
    def __init__(self, loop: str) -> None:
        self.loop = _new_loop(loop)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[NbdServer] = []

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def serve(self, backend: Any, address: str, **options: Any) -> NbdServer:
        log = structlog.get_logger()
        server = self.call(serve_nbd(backend, address, EXPORT, log=log,
                                     description="pvs test export", **options))
        self.servers.append(server)
        return server

    def stop(self) -> None:
        async def close_all() -> None:
            for server in self.servers:
                server.close()
                await server.wait_closed(grace=5.0)

        self.call(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "asyncio":
        return asyncio.new_event_loop()
    uvloop = pytest.importorskip("uvloop")
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "vdisk.raw"
    path.write_bytes(random.Random(42).randbytes(SIZE))
    return path


@pytest.fixture(params=["uvloop", "asyncio"])
def servers(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    owner = ThreadServer(request.param)
    try:
        yield owner
    finally:
        owner.stop()


@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"unix:{tmp_path}/nbd.sock" if request.param == "unix" else "127.0.0.1:0"


def uri(server: NbdServer) -> str:
    if server.address.startswith("unix:"):
        return f"nbd+unix:///{EXPORT}?socket={server.address[5:]}"
    return f"nbd://{server.address}/{EXPORT}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- read-only export ---------------------------------------------------------------------


def test_nbdinfo(servers: ThreadServer, image: Path, address: str) -> None:
    need("nbdinfo")
    server = servers.serve(FileBackend(image), address)
    info = json.loads(run("nbdinfo", "--json", uri(server)).stdout)
    [export] = info["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is True
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * 1024 * 1024
    assert export["can_multi_conn"] is True
    assert info["protocol"] == "newstyle-fixed"
    listing = run("nbdinfo", "--list", uri(server).replace(f"/{EXPORT}", "/")).stdout
    assert f'export="{EXPORT}"' in listing and "pvs test export" in listing


def test_nbdcopy_whole_export(servers: ThreadServer, image: Path, address: str,
                              tmp_path: Path) -> None:
    need("nbdcopy")
    server = servers.serve(FileBackend(image), address)
    copy = tmp_path / "copy.raw"
    run("nbdcopy", uri(server), str(copy))
    assert sha256(copy) == sha256(image)


def test_qemu_img_compare(servers: ThreadServer, image: Path, address: str) -> None:
    need("qemu-img")
    server = servers.serve(FileBackend(image), address)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri(server))


def test_writes_to_a_read_only_export_fail(servers: ThreadServer, image: Path,
                                           tmp_path: Path) -> None:
    need("qemu-io")
    server = servers.serve(FileBackend(image), f"unix:{tmp_path}/nbd.sock")
    result = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4096", uri(server)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert "Permission denied" in result.stderr  # qemu saw READ_ONLY and would not open it
    # A client that writes anyway gets EPERM, and the connection goes on.
    with RawClient(server) as client:
        client.send(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.WRITE, 1, 0, 4)
                    + b"data")
        assert client.simple_reply() == (wire.NbdError.EPERM, 1)
        client.send(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.READ, 2, 0, 4))
        assert client.simple_reply() == (0, 2)
        assert client.receive(4) == image.read_bytes()[:4]


class RawClient:
    """Just enough of a client to break rules on purpose: newstyle, GO, simple replies."""

    def __init__(self, server: NbdServer) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(server.address[len("unix:"):])
        assert self.receive(18)[:16] == b"NBDMAGICIHAVEOPT"
        name = EXPORT.encode()
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.send(struct.pack(">I", 3) + wire.OPTION_HEADER.pack(wire.IHAVEOPT, 7, len(go)) + go)
        while True:
            _, _, reply, length = wire.OPTION_REPLY.unpack(self.receive(20))
            self.receive(length)
            if reply == wire.Reply.ACK:
                break

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            piece = self.sock.recv(count - len(data))
            assert piece, "the server closed the connection"
            data += piece
        return data

    def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = wire.SIMPLE_REPLY.unpack(self.receive(16))
        assert magic == wire.SIMPLE_REPLY_MAGIC
        return error, handle

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


def test_backend_exceptions_become_eio(servers: ThreadServer, image: Path,
                                       tmp_path: Path) -> None:
    need("qemu-io")
    backend = FileBackend(image)
    server = servers.serve(backend, f"unix:{tmp_path}/nbd.sock")
    backend.fail_reads = True
    result = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4096", uri(server)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert "Input/output error" in result.stdout + result.stderr
    backend.fail_reads = False
    run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4096", uri(server))  # still serving


def test_two_clients_at_once(servers: ThreadServer, image: Path, address: str,
                             tmp_path: Path) -> None:
    need("nbdcopy")
    server = servers.serve(FileBackend(image), address)
    copies = [tmp_path / f"copy{i}.raw" for i in range(2)]
    processes = [subprocess.Popen(["nbdcopy", uri(server), str(copy)]) for copy in copies]
    for process in processes:
        assert process.wait(60) == 0
    assert all(sha256(copy) == sha256(image) for copy in copies)


def test_client_killed_mid_transfer(servers: ThreadServer, image: Path, address: str,
                                    tmp_path: Path) -> None:
    need("nbdcopy")
    backend = FileBackend(image)
    backend.delay = 0.05  # 512 reads, 4 at a time: the copy would take 6 s
    server = servers.serve(backend, address)
    victim = subprocess.Popen([
        "nbdcopy", "--connections=1", "--requests=4", "--request-size=65536", uri(server), "null:"
    ])
    try:
        _wait_for(lambda: len(server.connections) > 0, "the copy to connect")
        time.sleep(0.3)
        assert victim.poll() is None, "the copy ended before it could be killed"
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
    backend.delay = 0.0
    copy = tmp_path / "after.raw"
    run("nbdcopy", uri(server), str(copy))
    assert sha256(copy) == sha256(image)
    _wait_for(lambda: not server.connections, "the killed client's connections to end")


def test_pipelined_requests_are_bounded_and_all_answered(
    servers: ThreadServer, image: Path, tmp_path: Path
) -> None:
    backend = FileBackend(image)
    backend.delay = 0.01
    server = servers.serve(backend, f"unix:{tmp_path}/nbd.sock", max_in_flight=16)
    data = image.read_bytes()
    with RawClient(server) as client:
        count = 300
        client.send(b"".join(
            wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.READ, handle, handle * 512, 512)
            for handle in range(count)))
        seen = set()
        for _ in range(count):
            error, handle = client.simple_reply()
            assert error == 0
            assert client.receive(512) == data[handle * 512 : handle * 512 + 512]
            seen.add(handle)
    assert seen == set(range(count))
    assert 1 < backend.most_reading <= 16


def test_oversized_write_drops_only_that_client(servers: ThreadServer, image: Path,
                                                tmp_path: Path) -> None:
    server = servers.serve(FileBackend(image), f"unix:{tmp_path}/nbd.sock")
    too_large = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.WRITE, 1, 0, 1 << 31)
    with RawClient(server) as client, pytest.raises((AssertionError, ConnectionError)):
        client.send(too_large)  # the server hangs up, so one of these fails
        for _ in range(64):
            client.send(bytes(65536))
        client.receive(16)
    with RawClient(server) as client:
        client.send(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.READ, 2, 0, 8))
        assert client.simple_reply() == (0, 2) and client.receive(8) == image.read_bytes()[:8]


def test_close_answers_requests_in_flight(servers: ThreadServer, image: Path,
                                          tmp_path: Path) -> None:
    backend = FileBackend(image)
    backend.delay = 0.5
    server = servers.serve(backend, f"unix:{tmp_path}/nbd.sock")
    with RawClient(server) as client:
        client.send(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.READ, 1, 0, 8))
        _wait_for(lambda: backend.reading == 1, "the read to reach the backend")
        servers.loop.call_soon_threadsafe(server.close)
        _wait_for(lambda: server._closing, "close() to run")
        client.send(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, CommandKind.READ, 2, 0, 8))
        assert client.simple_reply() == (wire.NbdError.ESHUTDOWN, 2)
        assert client.simple_reply() == (0, 1) and client.receive(8) == image.read_bytes()[:8]
        assert client.sock.recv(1) == b""  # then the server closes


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- writable export over a write cache -----------------------------------------------------


@pytest.fixture(params=["ram", "ram+overflow"])
def cached(request: pytest.FixtureRequest, image: Path, tmp_path: Path) -> Iterator[
        CachedBackend]:
    cache = WriteCache(request.param, SIZE, 16 * 1024 * 1024, directory=str(tmp_path),
                       ram_limit=1024 * 1024 if request.param == "ram+overflow" else None)
    try:
        yield CachedBackend(image, cache)
    finally:
        cache.close()


def test_qemu_io_writes_then_nbdcopy_gives_merged_content(
    servers: ThreadServer, image: Path, cached: CachedBackend, address: str, tmp_path: Path
) -> None:
    need("qemu-io", "nbdcopy")
    server = servers.serve(cached, address)
    commands = ["write -P 0xab 4096 1M", "write -P 0xcd 3000000 70000", "write -z 8M 64k",
                "discard 9M 8k", "read -P 0xab 4096 1M", "read -P 0xcd 3000000 70000",
                "read -P 0 8M 64k", "read -P 0 9M 8k", "flush"]
    arguments = [part for command in commands for part in ("-c", command)]
    output = run("qemu-io", "-f", "raw", *arguments, uri(server)).stdout
    assert "Pattern verification failed" not in output
    expected = bytearray(image.read_bytes())
    expected[4096 : 4096 + 2**20] = b"\xab" * 2**20
    expected[3000000:3070000] = b"\xcd" * 70000
    expected[8 * 2**20 : 8 * 2**20 + 65536] = bytes(65536)
    expected[9 * 2**20 : 9 * 2**20 + 8192] = bytes(8192)
    copy = tmp_path / "merged.raw"
    run("nbdcopy", uri(server), str(copy))
    assert copy.read_bytes() == expected
    assert image.read_bytes() != expected  # the base was never written


def test_fio_verify_through_the_cache(servers: ThreadServer, cached: CachedBackend,
                                      tmp_path: Path) -> None:
    need("fio")
    server = servers.serve(cached, f"unix:{tmp_path}/nbd.sock")
    result = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri(server)}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M",
                 "--verify=crc32c", "--do_verify=1", "--randrepeat=0", "--verify_state_save=0",
                 "--output-format=json", timeout=120)
    text = result.stdout
    report = json.loads(text[text.index("{"):])
    assert report["jobs"][0]["error"] == 0


def test_full_cache_is_enospc(servers: ThreadServer, image: Path, tmp_path: Path) -> None:
    need("qemu-io")
    cache = WriteCache("ram", SIZE, 1024 * 1024)
    try:
        server = servers.serve(CachedBackend(image, cache), f"unix:{tmp_path}/nbd.sock")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", uri(server))
        result = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 0x22 2M 64k", "-c", "read -P 0x11 0 1M",
             uri(server)], capture_output=True, text=True, timeout=30, check=False)
        assert "No space left on device" in result.stdout + result.stderr
        assert "Pattern verification failed" not in result.stdout
    finally:
        cache.close()


def test_nbdfuse(servers: ThreadServer, image: Path, tmp_path: Path) -> None:
    need("nbdfuse")
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        pytest.skip("mounting FUSE needs root or fusermount3")
    unmount = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    server = servers.serve(FileBackend(image), f"unix:{tmp_path}/nbd.sock")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fuse = subprocess.Popen(["nbdfuse", "-r", str(mountpoint), "--uri", uri(server)])
    try:
        _wait_for(lambda: (mountpoint / "nbd").exists(), "nbdfuse to mount")
        assert sha256(mountpoint / "nbd") == sha256(image)
    finally:
        subprocess.run([*unmount, str(mountpoint)], check=False, timeout=30)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(fuse.pid, signal.SIGKILL)
            fuse.wait(10)


def test_close_removes_the_unix_socket(servers: ThreadServer, image: Path,
                                       tmp_path: Path) -> None:
    need("nbdinfo")
    path = tmp_path / "nbd.sock"
    server = servers.serve(FileBackend(image), f"unix:{path}")
    run("nbdinfo", "--size", uri(server))

    async def close() -> None:
        server.close()
        await server.wait_closed(grace=5.0)

    servers.call(close())
    assert not path.exists()
