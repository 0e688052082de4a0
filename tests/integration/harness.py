"""Integration test tools: real pvsd processes on loopback, real vDisks, real targets.

Everything here starts real processes and opens real sockets on 127.0.0.0/8; nothing is mocked.
Each server gets its own loopback address (127.0.0.11, .12, ...) and a free port, so several can
run at once, as a site of servers will. A `Pvsd` is stopped by its owner whatever happens (use it
as a context manager or through the ``pvsd_factory`` fixture); only processes started here are
ever signalled, and only by their own PID.

Every wait is bounded in time and in count: a test that waits for something that never comes
fails with the server's log in the message, instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.manifest import Manifest, hash_blocks
from pvs_target.client import Session, login, read_range

PYTHON = sys.executable
"""The interpreter running the tests: its environment has pvsd, pvsctl and pvs-target."""
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
MIB = 1024 * 1024

_hosts = itertools.count()


def loopback_host() -> str:
    """A loopback address of its own (127.0.0.11, .12, ... .210, then again) for the next
    server, so that servers of one test never share an address."""
    return f"127.0.0.{11 + next(_hosts) % 200}"


def free_port(host: str, span: int = 2, attempts: int = 50) -> int:
    """A port on ``host`` such that it and the ``span - 1`` ports after it are free.

    pvsd may open its admin API on the listen port + 1, hence the default span of 2.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
        if port + span - 1 > 65535:
            continue
        if all(_port_is_free(host, candidate) for candidate in range(port, port + span)):
            return port
    raise RuntimeError(f"no run of {span} free ports on {host} after {attempts} attempts")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class ServerFailed(AssertionError):
    """A pvsd did not do what the test waited for; the message carries its log."""


class Pvsd:
    """One ``python -m pvsd`` process with JSON logs in a file.

    ``start`` returns once the server logs "listening" (and, if asked, once each named vDisk
    has published its identity). ``stop`` sends SIGTERM and waits; a server that does not exit
    in time is killed, and the test is told.
    """

    def __init__(
        self,
        name: str,
        stores: Sequence[Path] | Path,
        workdir: Path,
        *,
        host: str | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.stores = [stores] if isinstance(stores, Path) else list(stores)
        self.host = host or loopback_host()
        self.port = port or free_port(self.host)
        self.args = list(args)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"pvsd-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # -- identity ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def command(self) -> list[str]:
        command = [PYTHON, "-m", "pvsd", "--name", self.name, "--listen", self.address]
        for store in self.stores:
            command += ["--store", str(store)]
        workers = os.environ.get("PVS_TEST_STREAM_WORKERS")  # the suite again, with workers
        if workers and "--stream-workers" not in self.args:
            command += ["--stream-workers", workers]
        return [*command, "--log-json", *self.args]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- life -------------------------------------------------------------------------------

    def start(self, *, vdisks: Sequence[str] = (), timeout: float = START_TIMEOUT) -> Pvsd:
        """Start and wait until listening (and until each of ``vdisks`` has an identity)."""
        assert self.process is None, "already started"
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            deadline = time.monotonic() + timeout
            self.wait_for_log("listening", timeout=max(deadline - time.monotonic(), 0.1))
            for vdisk in vdisks:
                self.wait_for_log(
                    "identity_published", timeout=max(deadline - time.monotonic(), 0.1),
                    vdisk=vdisk,
                )
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait; SIGKILL if it did not exit (and then raise). Returns the exit code."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a frozen server cannot handle SIGTERM
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServerFailed(
                    f"pvsd {self.name} did not exit within {timeout:g} s of SIGTERM; killed it"
                    f"\n{self.log_tail()}"
                ) from None
        self.returncode = process.returncode
        return process.returncode

    async def stop_async(self, timeout: float = STOP_TIMEOUT) -> int:
        """`stop` without blocking the event loop (targets in this loop keep running)."""
        return await asyncio.to_thread(self.stop, timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
        self.returncode = process.returncode

    def signal(self, signum: int) -> None:
        assert self.process is not None and self.process.poll() is None, "not running"
        os.kill(self.process.pid, signum)

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        assert self.process is not None
        try:
            self.returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerFailed(
                f"pvsd {self.name} still runs after {timeout:g} s\n{self.log_tail()}"
            ) from None
        return self.returncode

    def __enter__(self) -> Pvsd:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            self.kill()  # a no-op once it has exited

    # -- logs -------------------------------------------------------------------------------

    def log_lines(self) -> list[dict[str, Any]]:
        """Every log line so far, parsed. A line that is not JSON (a traceback, a message
        from Python itself) comes back as ``{"event": "<not json>", "raw": line}``."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        lines: list[dict[str, Any]] = []
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                lines.append(parsed)
            else:
                lines.append({"event": "<not json>", "raw": line})
        return lines

    def find_logs(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if _matches(line, event, fields)]

    def wait_for_log(
        self, event: str, timeout: float = 10.0, *, count: int = 1, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th log line with this event and these field values; wait for it
        (bounded). A field value may be a callable, used as a predicate on the field."""
        deadline = time.monotonic() + timeout
        while (found := self._look(event, fields, count, deadline, timeout)) is None:
            time.sleep(0.02)
        return found

    async def until_log(
        self, event: str, timeout: float = 10.0, *, count: int = 1, **fields: Any
    ) -> dict[str, Any]:
        """`wait_for_log` for async tests: the event loop keeps running while it waits."""
        deadline = time.monotonic() + timeout
        while (found := self._look(event, fields, count, deadline, timeout)) is None:
            await asyncio.sleep(0.02)
        return found

    def _look(
        self, event: str, fields: dict[str, Any], count: int, deadline: float, timeout: float
    ) -> dict[str, Any] | None:
        alive = self.alive()  # before reading the log, so that a last line is not missed
        found = self.find_logs(event, **fields)
        if len(found) >= count:
            return found[count - 1]
        wanted = f"{event} {fields}" + (f" {count} times" if count > 1 else "")
        if not alive:
            raise ServerFailed(
                f"pvsd {self.name} exited (code {self._exit_code()}) before logging {wanted}"
                f"\n{self.log_tail()}"
            )
        if time.monotonic() >= deadline:
            raise ServerFailed(
                f"pvsd {self.name} did not log {wanted} within {timeout:g} s\n{self.log_tail()}"
            )
        return None

    def log_tail(self, count: int = 40) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "--- log of pvsd " + self.name + " ---\n" + "\n".join(lines[-count:])

    def trouble(self) -> list[dict[str, Any]]:
        """Log lines that mean a bug in the server: errors about itself, or anything not JSON
        (an uncaught exception, asyncio's "Exception in callback" report)."""
        bad_events = {"<not json>", "internal_error", "internal_protocol_error"}
        return [
            line for line in self.log_lines()
            if line.get("event") in bad_events or "exception" in line
        ]

    def _exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


class Servers:
    """Starts pvsd processes and stops every one of them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Pvsd] = []

    def __call__(
        self,
        name: str = "pvs1",
        stores: Sequence[Path] | Path | None = None,
        *,
        vdisks: Sequence[str] = (),
        args: Sequence[str] = (),
        start: bool = True,
    ) -> Pvsd:
        server = Pvsd(
            name, stores if stores is not None else self.workdir / "store", self.workdir,
            args=args,
        )
        self.started.append(server)
        if start:
            server.start(vdisks=vdisks)
        return server

    def stop_all(self) -> None:
        """Stop each server (SIGTERM, then SIGKILL if needed); raise the first failure."""
        failures: list[BaseException] = []
        for server in reversed(self.started):
            try:
                server.stop()
            except BaseException as error:  # go on stopping the others first
                failures.append(error)
            finally:
                server.kill()
        if failures:
            raise failures[0]


def _matches(line: dict[str, Any], event: str, fields: dict[str, Any]) -> bool:
    if line.get("event") != event:
        return False
    for key, wanted in fields.items():
        if key not in line:
            return False
        if callable(wanted):
            if not wanted(line[key]):
                return False
        elif line[key] != wanted:
            return False
    return True


@contextlib.contextmanager
def running(pvsd: Pvsd, *, vdisks: Sequence[str] = ()) -> Iterator[Pvsd]:
    """Start ``pvsd`` and stop it on the way out, whatever happened."""
    try:
        pvsd.start(vdisks=vdisks)
        yield pvsd
    finally:
        try:
            pvsd.stop()
        finally:
            pvsd.kill()


# -- vDisks -----------------------------------------------------------------------------------


def image_path(store: Path, name: str) -> Path:
    return store / f"{name}.img"


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def make_vdisk(store: Path, name: str, size: int, seed: int | None = 0) -> str:
    """Create vDisk ``name`` in ``store`` with the real pvsctl; return its SHA-256 (hex).

    With a ``seed`` the image holds ``random_bytes(size, seed)`` (imported with
    ``pvsctl vdisk import``); with ``seed=None`` it is an empty sparse disk (``vdisk create``).
    ``size`` must be a multiple of 512, as pvsctl requires.
    """
    store.mkdir(parents=True, exist_ok=True)
    if seed is None:
        data = bytes(size)
        pvsctl("vdisk", "create", name, "--size", str(size), "--store", str(store))
    else:
        data = random_bytes(size, seed)
        source = store.parent / f".{store.name}-{name}.source"
        source.write_bytes(data)
        try:
            pvsctl("vdisk", "import", str(source), "--name", name, "--store", str(store))
        finally:
            source.unlink(missing_ok=True)
    digest = hashlib.sha256(image_path(store, name).read_bytes()).hexdigest()
    assert digest == hashlib.sha256(data).hexdigest(), "pvsctl did not store the bytes given"
    return digest


def manifest_path(store: Path, name: str) -> Path:
    return store / f"{name}.manifest"


def manifest_identity(store: Path, name: str) -> ReplicaIdentity:
    """The identity of the manifest beside vDisk ``name``'s image, read from the file itself.

    ``Manifest.decode`` checks every level and the root; the block digests are then compared
    with digests of the image's bytes computed here, so a test that compares a server's
    identity with this one checks it against the bytes on disk, not against the server.
    """
    manifest = Manifest.decode(manifest_path(store, name).read_bytes())
    data = image_path(store, name).read_bytes()
    assert manifest.size == len(data), f"manifest of {name} says {manifest.size} bytes"
    leaves = b"".join(hash_blocks(data, manifest.block_size))
    assert leaves == manifest.levels[0], f"the manifest of {name} does not match its image"
    return manifest.identity


def pvsctl(*args: str) -> None:
    """Run the real pvsctl (as ``python -m pvsd.ctl``); fail the test if it fails."""
    result = subprocess.run(
        [PYTHON, "-m", "pvsd.ctl", *args], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 0, f"pvsctl {' '.join(args)} failed: {result.stderr}"


def pvs_target(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real ``pvs-target`` command line (as ``python -m pvs_target``)."""
    return subprocess.run(
        [PYTHON, "-m", "pvs_target", *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, check=False,
    )


# -- targets through the library ------------------------------------------------------------


@contextlib.asynccontextmanager
async def logged_in(
    address: str | Sequence[str], vdisk: str, device_id: str = "it-target", **options: Any
) -> AsyncIterator[Session]:
    """A target session through ``pvs_target.login``, closed on the way out."""
    servers = [address] if isinstance(address, str) else list(address)
    session = await login(servers, vdisk, device_id, **options)
    try:
        yield session
    finally:
        await session.close()


async def read_whole(session: Session, *, chunk: int | None = None, depth: int = 8) -> bytes:
    data = await read_range(session, 0, session.size, chunk=chunk, depth=depth)
    assert data is not None
    return data


async def assert_serves(
    pvsd: Pvsd, vdisk: str, expected: bytes, *, device_id: str = "it-check"
) -> None:
    """A normal target still logs in and reads the whole vDisk byte for byte; pvsd is alive."""
    assert pvsd.alive(), f"pvsd {pvsd.name} is dead\n{pvsd.log_tail()}"
    async with asyncio.timeout(30), logged_in(pvsd.address, vdisk, device_id) as session:
        assert session.size == len(expected)
        data = await read_whole(session)
    assert data == expected, "bytes read differ from the image"
    assert pvsd.alive(), f"pvsd {pvsd.name} died\n{pvsd.log_tail()}"
    trouble = pvsd.trouble()
    assert not trouble, f"pvsd {pvsd.name} logged trouble: {trouble}"


# -- a raw client, for breaking the rules -----------------------------------------------------


class Closed(Exception):
    """The server closed the connection (or reset it) before a whole frame arrived."""


class RawClient:
    """A target made of a bare socket: sends whatever bytes a test gives it.

    ``read_event`` decodes frames with ``pvs_protocol.wire`` but without the state machine,
    so the test sees exactly what the server sent.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.checksum = ev.Checksum.NONE
        self.hello_reply: ev.HelloReply | None = None
        self.login_ok: ev.LoginOk | None = None
        self._ids = itertools.count(1)
        host, port = writer.get_extra_info("sockname")[:2]
        self.local_address = f"{host}:{port}"
        """What the server logs as this client's ``peer``."""

    @classmethod
    async def connect(cls, address: str, timeout: float = 5.0) -> RawClient:
        host, port = address.rsplit(":", 1)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def close(self, *, reset: bool = False) -> None:
        if reset:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close sends RST, as a crashed target would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            async with asyncio.timeout(5):
                await self.writer.wait_closed()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_event(self, event: ev.Event) -> None:
        await self.send(encoded(event, self.checksum))

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, int, int, bytes]:
        """(type, flags, request id, payload) of the next frame; raise Closed at EOF/reset."""
        async with asyncio.timeout(timeout):
            try:
                head = await self.reader.readexactly(wire.HEADER_SIZE)
                magic, kind, flags, length, request_id = wire.HEADER.unpack(head)
                _check_server_header(magic, kind, flags, request_id)
                payload = await self.reader.readexactly(length)
            except asyncio.IncompleteReadError as error:
                raise Closed(f"closed after {len(error.partial)} bytes of a frame") from None
            except ConnectionError as error:
                raise Closed(f"connection reset: {error}") from None
        return kind, flags, request_id, payload

    async def read_event(self, timeout: float = 10.0) -> ev.Event:
        kind, flags, request_id, payload = await self.read_frame(timeout)
        return wire.decode(wire.FrameType(kind), flags, request_id, payload, self.checksum)

    async def expect_closed(self, timeout: float = 10.0) -> list[ev.Event]:
        """Read until the server closes; return what came before. Bounded in time and count."""
        events: list[ev.Event] = []
        async with asyncio.timeout(timeout):
            for _ in range(10_000):
                try:
                    events.append(await self.read_event(timeout))
                except Closed:
                    return events
        raise AssertionError(f"server kept sending: {len(events)} frames")

    async def expect_goodbye(self, timeout: float = 10.0) -> ev.Goodbye | None:
        """Read until closed; the GOODBYE the server sent last, or None if none arrived
        (possible only when the server had to reset the connection)."""
        events = await self.expect_closed(timeout)
        goodbyes = [event for event in events if isinstance(event, ev.Goodbye)]
        assert len(goodbyes) <= 1, f"more than one GOODBYE: {events}"
        if goodbyes:
            assert events[-1] is goodbyes[0], f"frames after GOODBYE: {events}"
            return goodbyes[0]
        return None

    # -- the normal steps -------------------------------------------------------------------

    async def hello(self, max_request: int = MIB, *, crc32: bool = False) -> ev.HelloReply:
        checksums = frozenset({ev.Checksum.CRC32}) if crc32 else frozenset()
        hello = ev.Hello(wire.VERSION, wire.VERSION, max_request, checksums, "raw-test/1")
        await self.send_event(hello)
        reply = await self.read_event()
        assert isinstance(reply, ev.HelloReply), reply
        self.hello_reply = reply
        self.checksum = reply.checksum
        return reply

    async def login(self, vdisk: str, device_id: str = "raw-target") -> ev.Event:
        await self.send_event(ev.Login(device_id, vdisk))
        return await self.read_event()

    async def start(self, vdisk: str, max_request: int = MIB) -> ev.LoginOk:
        """HELLO and LOGIN; streaming may begin."""
        await self.hello(max_request)
        reply = await self.login(vdisk)
        assert isinstance(reply, ev.LoginOk), reply
        self.login_ok = reply
        return reply

    def next_id(self) -> int:
        return next(self._ids)

    async def read(self, offset: int, length: int) -> ev.Event:
        """One READ, and the frame that answers it."""
        request_id = self.next_id()
        await self.send_event(ev.Read(request_id, offset, length))
        reply = await self.read_event()
        assert getattr(reply, "request_id", None) == request_id, reply
        return reply


_REQUEST_REPLIES = {wire.FrameType.READ_DATA, wire.FrameType.DONE, wire.FrameType.ERROR}


def _check_server_header(magic: int, kind: int, flags: int, request_id: int) -> None:
    """What docs/protocol.md (Frame header) asks of every frame a server sends."""
    assert magic == wire.MAGIC, f"server sent bad magic 0x{magic:04x}"
    assert kind >= 0x80 or kind in (wire.FrameType.KEEPALIVE, wire.FrameType.GOODBYE), (
        f"server sent a client frame type 0x{kind:02x}"
    )
    allowed = wire.FLAG_REPLY if kind == wire.FrameType.KEEPALIVE else 0
    assert flags & ~allowed == 0, f"server set reserved flag bits 0x{flags:02x} on 0x{kind:02x}"
    if kind not in _REQUEST_REPLIES:
        assert request_id == 0, f"server sent request id {request_id} on frame 0x{kind:02x}"


def frame(
    kind: int,
    payload: bytes = b"",
    request_id: int = 0,
    *,
    flags: int = 0,
    length: int | None = None,
    magic: int = wire.MAGIC,
) -> bytes:
    """Raw frame bytes, with no check at all: ``length`` may lie about the payload."""
    size = len(payload) if length is None else length
    return wire.HEADER.pack(magic, kind, flags, size, request_id) + payload


def string(text: str | bytes, *, length: int | None = None) -> bytes:
    """A protocol string, with no check at all: ``length`` may lie about the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(raw) if length is None else length) + raw


def encoded(event: ev.Event, checksum: ev.Checksum = ev.Checksum.NONE) -> bytes:
    """The frame for ``event``, encoded by ``pvs_protocol.wire`` without any state machine."""
    return b"".join(bytes(part) for part in wire.encode(event, checksum))


def read_frame_bytes(request_id: int, offset: int, length: int) -> bytes:
    return frame(wire.FrameType.READ, struct.pack(">QI", offset, length), request_id)


def ignore_disconnects() -> contextlib.AbstractContextManager[None]:
    """For sends that may race the server closing the connection."""
    return contextlib.suppress(ConnectionError, BrokenPipeError)


def process_memory_kib(pid: int, field: str = "VmHWM") -> int:
    """A memory figure of a live process from /proc (VmHWM: peak resident set size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)

