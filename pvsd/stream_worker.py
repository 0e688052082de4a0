"""A stream worker process: serves the read-only sessions pvsd hands it (see `pvsd.workers`).

    python -m pvsd.stream_worker --channel FD --name NAME --number N [options]

Each session arrives logged in, with its socket, image and manifest open: the worker answers
READ, DIGESTS, FLUSH and KEEPALIVE under the same protocol rules (`pvs_protocol.connection`,
taken over in the streaming phase), refuses WRITE as any read-only session does, relays
DAMAGED reports to pvsd, and passes on what pvsd says to the target (RELOGIN, SITE, GOODBYE).
It reads the page cache on its loop and what would block in threads, like pvsd's own sessions
(`pvsd.session`), and answers a read still in its thread after ``--stall-timeout`` with a
retryable IO_ERROR. When pvsd's end of the channel closes (pvsd exited, or was killed), the
worker ends its connections and exits: its targets fail over as from any server that went
away.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from pvs_protocol import events as ev
from pvs_protocol.buffers import BufferPool, Lent
from pvs_protocol.connection import Connection, Role
from pvs_protocol.errors import ErrorCode, ProtocolError
from pvs_protocol.manifest import ManifestError
from pvsd import logs
from pvsd.budget import BudgetKeeper
from pvsd.identity import content_key
from pvsd.manifest import ManifestFile, manifest_of
from pvsd.metrics import RequestStats
from pvsd.replies import Replies, digest_page
from pvsd.workers import Channel, Message

log = structlog.get_logger("pvsd.stream_worker")

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
BYTES_INTERVAL = 1.0
"""How often pvsd hears each session's byte count (its rate, metrics and status)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    idle_timeout: float
    stall_timeout: float
    pvsd_timeout: float
    """Nothing heard from pvsd for this long: it is frozen, and the site counts this server
    down; the sessions here end so that their targets move."""
    reply_budget: int
    """This worker's share of the server's ``reply_budget`` (pvsd.budget)."""
    max_request: int


class WorkerSession(asyncio.Protocol):
    """One target's read-only session, from the first request after its login."""

    def __init__(self, worker: StreamWorker, session_id: int, state: Message,
                 image_fd: int, manifest: ManifestFile) -> None:
        self.worker = worker
        self.session_id = session_id
        self.vdisk = str(state["vdisk"])
        self.size = int(state["size"])
        self.stat_key = tuple(int(v) for v in state["stat"])
        self.image_fd = image_fd
        self.manifest = manifest
        self.conn = Connection.handed_over(
            Role.SERVER, max_request=int(state["max_request"]),
            max_in_flight=int(state["max_in_flight"]),
            checksum=ev.Checksum(int(state["checksum"])), screen=self._screen_write,
        )
        self.invalid = ""
        """Why this replica may no longer be served (pvsd said so), or empty."""
        self.bytes_read = 0
        self.transport: asyncio.Transport | None = None
        self.last_heard = time.monotonic()
        self.peer = str(state.get("peer", ""))
        self._log = log.bind(peer=self.peer, device=state.get("device", ""),
                             vdisk=self.vdisk, session=f"{session_id:016x}")
        self.replies = Replies(self.conn)
        self._unchanged = False
        self._paused = False
        """Requests are not read: the transport's buffer is full, or this worker's share of
        the reply budget is spent and this session holds much of it (pvsd.budget)."""
        self._write_paused = False
        self._budget_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed_why = ""
        self._reads = 0
        """Reads answered from the page cache in this burst (their latency: pvsd.metrics)."""

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        max_request = self.conn.max_request
        self.transport.set_write_buffer_limits(high=4 * max_request)
        self.replies.attach(self.transport, Lent(
            self.worker.buffers.give, self.transport, asyncio.get_running_loop(),
            limit=8 * max_request, unsent=self._unsent,
        ))
        self._arm_timer(self.worker.settings.idle_timeout)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def _process(self) -> None:
        self.replies.burst()
        self._unchanged = False
        self._reads = 0
        started = time.monotonic()
        try:
            while self.transport is not None and not self.transport.is_closing():
                if self._paused:
                    return
                event = self.conn.next_event()
                if event is ev.NEED_DATA:
                    break
                assert not isinstance(event, ev.NeedData)
                self.last_heard = time.monotonic()
                self._handle(event)
        except ProtocolError as error:
            self._log.warning("protocol_error", code=error.code.name, error=error.message)
            self.close(error.code, error.message)
        finally:
            self.replies.flush()
            if self._reads:
                self.worker.requests.reads(time.monotonic() - started, self._reads)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.replies.detach()
        self.transport = None
        why = self._closed_why or (str(exc) if exc else "closed by target")
        self.worker.ended(self, why)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    def budget_pause(self) -> None:
        self._budget_paused = True
        self._pause()

    def budget_resume(self) -> None:
        self._budget_paused = False
        self._resume()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self._write_paused and not self._budget_paused:
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()
                self._process()

    def _unsent(self, size: int) -> None:
        if self.worker.sessions.get(self.session_id) is self:
            self.worker.budget.unsent(self, size)

    # -- what pvsd says ---------------------------------------------------------------------

    def send(self, event: ev.Event) -> None:
        self.replies.send(event, self._log)

    def close(self, code: int = 0, message: str = "") -> None:
        if self.transport is None:
            return
        self._closed_why = self._closed_why or message
        self.send(ev.Goodbye(code, message))
        self.replies.flush()
        self.transport.close()

    def abort(self, why: str) -> None:
        if self.transport is not None:
            self._closed_why = why
            self.transport.abort()

    # -- requests ---------------------------------------------------------------------------

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.Read():
                self._read(event)
            case ev.Digests():
                self._digests(event)
            case ev.Flush(request_id):
                self.send(ev.Done(request_id))  # nothing of ours is unwritten
                self.worker.requests.observe("flush", time.monotonic() - self.last_heard)
            case ev.Error(request_id, code, message):  # a WRITE the screen refused
                self._refuse(request_id, code, message)
            case ev.Damaged(block, message):
                self.worker.channel_send(
                    {"op": "damaged", "session": self.session_id, "block": block,
                     "message": message[:1000]}
                )
            case ev.Keepalive(token, reply=False):
                self.send(ev.Keepalive(token, reply=True))
            case ev.Goodbye(code, message):
                self._log.info("target_said_goodbye", code=code, message=message)
                self._closed_why = "said goodbye"
                self.replies.flush()
                if self.transport is not None:
                    self.transport.close()
            case _:
                pass  # a KEEPALIVE reply

    def _screen_write(self, request_id: int, _offset: int, _length: int) -> ev.Error:
        return ev.Error(
            request_id, ErrorCode.READ_ONLY,
            f"{self.vdisk} is a Standard Image: writes belong in the target's write cache",
        )

    def _refuse(self, request_id: int, code: ErrorCode, message: str) -> None:
        self._log.warning("request_refused", request=request_id, code=code.name, error=message)
        self.send(ev.Error(request_id, code, message))

    def _servable(self, request_id: int) -> bool:
        """Whether this replica may still be served: not withdrawn by pvsd, and the image file
        not written since login (one fstat per burst of requests, as pvsd's sessions do)."""
        if not self.invalid and not self._unchanged:
            self._unchanged = content_key(self.image_fd) == self.stat_key
            if not self._unchanged:
                self.invalid = f"replica of {self.vdisk} changed since login: log in again"
        if self.invalid:
            self._refuse(request_id, ErrorCode.NO_IDENTICAL_REPLICA, self.invalid)
            return False
        return True

    def _read(self, read: ev.Read) -> None:
        if read.offset + read.length > self.size:
            self._refuse(read.request_id, ErrorCode.OUT_OF_RANGE,
                         f"bytes {read.offset}..{read.offset + read.length} lie past the end "
                         f"of {self.vdisk} ({self.size} bytes)")
            return
        if not self._servable(read.request_id):
            return
        buffer = self.worker.buffers.take(read.length)
        try:
            got = os.preadv(self.image_fd, [buffer], read.offset, _NOWAIT)
        except BlockingIOError:
            got = 0
        except OSError as error:
            self._io_failed(read.request_id, error)
            return
        if got == read.length:
            self.bytes_read += got
            self.send(ev.ReadData(read.request_id, buffer))
            self._reads += 1
        else:
            since = time.monotonic()
            task = asyncio.ensure_future(self._read_rest(buffer, read, got))
            task.add_done_callback(lambda done: self._read_done(done, read.request_id, since))

    async def _read_rest(self, buffer: bytearray, read: ev.Read, got: int) -> bytearray:
        view = memoryview(buffer)
        loop = asyncio.get_running_loop()
        while got < len(buffer):
            count = await asyncio.wait_for(
                loop.run_in_executor(self.worker.io_pool, os.preadv, self.image_fd,
                                     [view[got:]], read.offset + got),
                self.worker.settings.stall_timeout,
            )
            if count == 0:
                raise OSError(0, "image is shorter than its identity says (truncated?)")
            got += count
        return buffer

    def _read_done(self, task: asyncio.Future[bytearray], request_id: int, since: float) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, TimeoutError):
            self._log.warning(
                "request_stalled", request=request_id, seconds=self.worker.settings.stall_timeout,
                hint="answered with IO_ERROR so that the target moves; the store does not answer",
            )
            self.send(ev.Error(request_id, ErrorCode.IO_ERROR,
                               f"read of {self.vdisk}: the store of this server is not "
                               "answering (stalled I/O): log in at another server"))
        elif isinstance(error, OSError):
            self._io_failed(request_id, error)
        elif error is not None:
            self._log.error("internal_error", request=request_id, error=repr(error))
            self.send(ev.Error(request_id, ErrorCode.INTERNAL, "read: internal error"))
        else:
            data = task.result()
            self.bytes_read += len(data)
            self.send(ev.ReadData(request_id, data))
            self.worker.requests.observe("read", time.monotonic() - since)

    def _io_failed(self, request_id: int, error: OSError) -> None:
        self._log.error("io_error", request=request_id, op="read", error=str(error),
                        hint=f"check the image of {self.vdisk} and the disk it lives on")
        self.send(ev.Error(request_id, ErrorCode.IO_ERROR, f"read failed on the server: {error}"))

    def _digests(self, request: ev.Digests) -> None:
        if self.invalid:
            self._refuse(request.request_id, ErrorCode.NO_IDENTICAL_REPLICA, self.invalid)
            return
        try:
            page = digest_page(self.manifest, request)
        except OSError as error:
            self._io_failed(request.request_id, error)
            return
        if isinstance(page, str):
            self._refuse(request.request_id, ErrorCode.OUT_OF_RANGE, page)
            return
        self.send(ev.ReadData(request.request_id, page))
        self.worker.requests.observe("digests", time.monotonic() - self.last_heard)

    # -- timers -----------------------------------------------------------------------------

    def _arm_timer(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._on_timer)

    def _on_timer(self) -> None:
        idle = time.monotonic() - self.last_heard
        limit = self.worker.settings.idle_timeout
        if idle >= limit:
            self._log.warning("idle_timeout", seconds=round(idle, 1))
            self.close(ErrorCode.TIMEOUT, f"nothing received for {limit:.0f} s")
        else:
            self._arm_timer(limit - idle)


class StreamWorker:
    """The sessions of this process, and its channel to pvsd."""

    def __init__(self, channel: socket.socket, settings: Settings, io_threads: int) -> None:
        self.settings = settings
        self.budget: BudgetKeeper[WorkerSession] = BudgetKeeper(
            settings.reply_budget, settings.max_request
        )
        self.buffers = BufferPool()
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="pvsd-worker-io")
        self.sessions: dict[int, WorkerSession] = {}
        self.manifests: dict[tuple[int, ...], tuple[ManifestFile, set[int]]] = {}
        """Loaded manifests by file (device, inode, size, times), with the sessions using
        each: loading one reads the whole file (its leaves are checked against its root), so
        the sessions of one replica share it."""
        self.requests = RequestStats()
        """Latencies since the last report to pvsd, which keeps the server's."""
        self._sock = channel
        self._channel: Channel | None = None
        self._done = asyncio.get_running_loop().create_future()
        self._heard = time.monotonic()

    async def run(self) -> None:
        self._channel = Channel(self._sock, self._message, self._pvsd_gone)
        reporter = asyncio.ensure_future(self._report_bytes())
        try:
            await self._done
        finally:
            reporter.cancel()
            self.io_pool.shutdown(wait=False, cancel_futures=True)

    def channel_send(self, message: Message) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def ended(self, session: WorkerSession, why: str) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            self.channel_send({"op": "ended", "session": session.session_id,
                               "bytes": session.bytes_read, "reason": why})
            os.close(session.image_fd)
            self.budget.forget(session)
            self._release_manifest(session.session_id)

    def _release_manifest(self, session_id: int) -> None:
        for key, (manifest, users) in list(self.manifests.items()):
            users.discard(session_id)
            if not users:
                manifest.close()
                del self.manifests[key]

    async def _report_bytes(self) -> None:
        """Each session's bytes to pvsd, and a watch on pvsd itself: if it said nothing for
        ``pvsd_timeout``, every session here ends (once per silence)."""
        interval = min(BYTES_INTERVAL, self.settings.pvsd_timeout / 4)
        silent = False
        while True:
            await asyncio.sleep(interval)
            quiet = time.monotonic() - self._heard
            if quiet >= self.settings.pvsd_timeout and not silent and self.sessions:
                log.error(
                    "pvsd_not_answering", seconds=round(quiet, 1), sessions=len(self.sessions),
                    action="pvsd has sent nothing (frozen?); its peers count this server down: "
                    "the targets served here are disconnected so that they move",
                )
                for session in list(self.sessions.values()):
                    session.abort("pvsd is not answering")
            silent = quiet >= self.settings.pvsd_timeout
            if self.sessions:
                self._report()

    def _report(self, token: int = 0) -> None:
        buckets, sums = self.requests.take()
        self.channel_send({
            "op": "bytes", "token": token, "buckets": buckets, "sums": sums,
            "sessions": {str(sid): s.bytes_read for sid, s in self.sessions.items()},
        })

    def _message(self, message: Message, fds: list[int]) -> None:
        self._heard = time.monotonic()
        op = message.get("op")
        if op == "tick":
            return
        if op == "report":
            token = message.get("token")
            self._report(token if isinstance(token, int) else 0)
            return
        if op == "adopt":
            self._adopt(message, fds)
            return
        for fd in fds:
            os.close(fd)
        session = self.sessions.get(message.get("session", -1))
        if session is None:
            return
        match op:
            case "relogin":
                session.send(ev.Relogin(int(message["deadline_ms"]), str(message["message"]),
                                        tuple(message["servers"])))
            case "site":
                session.send(ev.SiteUpdate(tuple(message["servers"])))
            case "close":
                session.close(int(message["code"]), str(message["message"]))
            case "abort":
                session.abort(str(message.get("message", "closed by pvsd")))
            case "invalid":
                session.invalid = str(message["message"])
            case _:
                log.error("unknown_message", op=op)
        session.replies.flush()

    def _adopt(self, message: Message, fds: list[int]) -> None:
        if len(fds) != 3:
            log.error("adopt_without_descriptors", count=len(fds))
            for fd in fds:
                os.close(fd)
            return
        sock_fd, image_fd, manifest_fd = fds
        session_id = int(message["session"])
        try:
            manifest = self._manifest(manifest_fd, Path(str(message["manifest"])), session_id)
            session = WorkerSession(self, session_id, message, image_fd, manifest)
            sock = socket.socket(fileno=sock_fd)
        except (OSError, ValueError, KeyError, ManifestError) as error:
            log.error("adopt_failed", session=f"{session_id:016x}", error=str(error),
                      hint="the target's connection is closed; it logs in again")
            os.close(sock_fd)
            os.close(image_fd)
            self._release_manifest(session_id)
            self.channel_send({"op": "ended", "session": session_id, "bytes": 0,
                               "reason": f"handing over failed: {error}"})
            return
        self.sessions[session_id] = session
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(loop.connect_accepted_socket(lambda: session, sock))
        task.add_done_callback(lambda done: self._connected(done, session))

    def _manifest(self, fd: int, path: Path, session_id: int) -> ManifestFile:
        """The manifest open as ``fd``: the one already loaded from the same file, or loaded
        now (the descriptor is used or closed either way)."""
        try:
            result = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (result.st_dev, result.st_ino, result.st_size, result.st_mtime_ns,
               result.st_ctime_ns)
        known = self.manifests.get(key)
        if known is not None:
            os.close(fd)
            known[1].add(session_id)
            return known[0]
        manifest = manifest_of(fd, path)
        self.manifests[key] = (manifest, {session_id})
        return manifest

    def _connected(self, task: asyncio.Future[typing.Any], session: WorkerSession) -> None:
        if task.cancelled() or task.exception() is not None:
            log.error("adopt_failed", session=f"{session.session_id:016x}",
                      error=repr(task.exception()) if not task.cancelled() else "cancelled")
            self.ended(session, "handing over failed")

    def _pvsd_gone(self) -> None:
        """pvsd closed the channel (it exited or was killed): end every connection now, so
        that targets fail over rather than keep a server the site no longer has."""
        for session in list(self.sessions.values()):
            session.abort("pvsd is gone")
        if not self._done.done():
            self._done.set_result(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvsd.stream_worker",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--number", type=int, default=1)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-json", action="store_true")
    parser.add_argument("--io-threads", type=int, default=16)
    parser.add_argument("--idle-timeout", type=float, default=30.0)
    parser.add_argument("--stall-timeout", type=float, default=1.0)
    parser.add_argument("--pvsd-timeout", type=float, default=3.0)
    parser.add_argument("--reply-budget", type=int, default=256 << 20)
    parser.add_argument("--max-request", type=int, default=4 << 20)
    args = parser.parse_args(argv)
    logs.configure(json=args.log_json, level=args.log_level, name=args.name or None)
    structlog.contextvars.bind_contextvars(worker=args.number)
    # pvsd decides when this process ends (it closes the channel): a Ctrl-C meant for pvsd
    # reaches the whole process group, and pvsd first moves the targets served here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings(args.idle_timeout, args.stall_timeout, args.pvsd_timeout,
                        args.reply_budget, args.max_request)

    async def serve() -> None:
        channel = socket.socket(fileno=args.channel)
        await StreamWorker(channel, settings, args.io_threads).run()

    try:
        import uvloop
    except ImportError:  # as pvsd: uvloop where it is installed
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
