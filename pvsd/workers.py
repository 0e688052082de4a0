"""Stream workers: processes that serve logged-in read-only sessions, so that streaming uses
every core while the site sees one server.

pvsd stays the only member of the site: it accepts every connection, runs every handshake and
login (placement, redirects, writer locks), keeps every session in its count, its status and
its rebalancing, and speaks for all of them to peers. Once a read-only session has logged in
and nothing of it is left in flight, pvsd hands its socket, its image and its manifest (open
descriptors, so the worker serves exactly the replica the login chose) to the worker with the
fewest sessions (`pvsd.stream_worker`), and keeps the session as its stand-in: a RELOGIN, a
SITE, a close for it go to the worker as messages; the worker says how many bytes each session
read, relays DAMAGED reports, and says when a session ends.

Private Image writers and maintenance versions stay in pvsd (their writer locks and manifest
updates are pvsd's), as does every session while no worker is up. A worker that dies takes its
connections with it: their targets fail over as from any server that went away, and pvsd starts
a new worker.

The channel is a Unix SOCK_SEQPACKET pair: one JSON object per message, descriptors passed
alongside (SCM_RIGHTS). Messages, pvsd to worker: ``adopt`` (descriptors: socket, image,
manifest), ``relogin``, ``site``, ``close``, ``abort``, ``invalid``, ``report``, and ``tick``
every heartbeat interval; worker to pvsd: ``bytes`` (every second, and as the answer to
``report``: each session's bytes and the request latencies since the last), ``damaged``,
``ended``. A worker that hears nothing from pvsd for ``peer_timeout`` (pvsd frozen: its peers
count it down by then) ends its connections, so that its targets move as the site expects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from pvsd.budget import share

if TYPE_CHECKING:
    from pvsd.config import Config
    from pvsd.session import Session

log = structlog.get_logger("pvsd.workers")

MESSAGE_MAX = 64 * 1024
"""No message is longer: the longest is a RELOGIN with its message and server list."""
QUEUE_MAX = 100_000
"""Messages waiting for a worker that does not read them: past this it is wedged, and killed."""
RESTART_DELAY = 1.0
REPORT_TIMEOUT = 1.0
"""How long an admin request or a scrape waits for the workers' latest figures."""

Message = dict[str, Any]


class Channel:
    """One end of a worker's control channel, on the event loop: messages out are queued when
    the socket is full (with duplicates of their descriptors, closed once sent), messages in
    are handed to ``on_message`` with the descriptors that came with them."""

    def __init__(
        self, sock: socket.socket, on_message: Callable[[Message, list[int]], None],
        on_closed: Callable[[], None],
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._on_message = on_message
        self._on_closed = on_closed
        self._queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    def send(self, message: Message, fds: list[int] | None = None) -> None:
        if self.closed:
            return
        data = json.dumps(message, separators=(",", ":")).encode()
        owned = [os.dup(fd) for fd in fds or ()]
        self._queue.append((data, owned))
        if len(self._queue) == 1:
            self._flush()
        if len(self._queue) > QUEUE_MAX:
            log.error("worker_not_reading", queued=len(self._queue),
                      action="the stream worker does not read its messages: it is stopped")
            self.close()

    def _flush(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._writable)
                return
            except OSError:
                self.close()
                return
            self._queue.popleft()
            for fd in fds:
                os.close(fd)

    def _writable(self) -> None:
        self._loop.remove_writer(self.sock.fileno())
        self._flush()

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MESSAGE_MAX, 4)
            except BlockingIOError:
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data:
                self.close()
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                log.error("worker_message_truncated", length=len(data))
                for fd in fds:
                    os.close(fd)
                continue
            try:
                message = json.loads(data)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                log.error("worker_message_malformed", length=len(data))
                for fd in fds:
                    os.close(fd)
                continue
            self._on_message(message, fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        for _data, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        self.sock.close()
        self._on_closed()


class Worker:
    """One worker process and the sessions it serves."""

    def __init__(self, pool: Workers, number: int) -> None:
        self.pool = pool
        self.number = number
        self.sessions: dict[int, Session] = {}
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self._reports: dict[int, asyncio.Future[None]] = {}
        self._token = 0
        self.stalled: set[Path] = set()
        """Stores this worker's threads wait on past ``stall_timeout`` (pvsd.serving)."""

    @property
    def up(self) -> bool:
        return self.channel is not None and not self.channel.closed

    async def start(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = self.pool.config
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pvsd.stream_worker", "--channel", str(theirs.fileno()),
                "--name", config.name, "--number", str(self.number),
                "--log-level", config.log_level, *(["--log-json"] if config.log_json else []),
                "--io-threads", str(config.io_threads),
                "--idle-timeout", repr(config.idle_timeout),
                "--stall-timeout", repr(config.stall_timeout),
                "--pvsd-timeout", repr(config.peer_timeout),
                "--reply-budget", str(share(config.reply_budget, config.stream_workers)),
                "--max-request", str(config.max_request),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.channel = Channel(mine, self._message, self._closed)
        log.info("stream_worker_started", worker=self.number, pid=self.process.pid)

    def adopt(self, session: Session, fds: list[int], state: Message) -> None:
        assert self.channel is not None
        self.sessions[session.session_id] = session
        self.channel.send({"op": "adopt", "session": session.session_id, **state}, fds)

    def send(self, message: Message) -> None:
        if self.channel is not None:
            self.channel.send(message)

    def report(self) -> asyncio.Future[None]:
        """Ask for every session's figures now; the future is done once they are in."""
        self._token += 1
        future = self._reports[self._token] = asyncio.get_running_loop().create_future()
        self.send({"op": "report", "token": self._token})
        return future

    def _message(self, message: Message, fds: list[int]) -> None:
        for fd in fds:  # nothing a worker sends carries descriptors
            os.close(fd)
        op = message.get("op")
        if op == "bytes":
            counts = message.get("sessions")
            if isinstance(counts, dict):
                for key, count in counts.items():
                    session = self.sessions.get(_int(key))
                    if session is not None and isinstance(count, int):
                        session.bytes_read = count
            self.pool.on_stats(message.get("buckets"), message.get("sums"))
            report = self._reports.pop(_int(message.get("token")), None)
            if report is not None and not report.done():
                report.set_result(None)
            return
        if op == "store":
            store, stalled = message.get("store"), message.get("stalled")
            if isinstance(store, str) and isinstance(stalled, bool):
                (self.stalled.add if stalled else self.stalled.discard)(Path(store))
                self.pool.on_stalls(f"worker {self.number}", {Path(store): stalled})
            return
        session = self.sessions.get(_int(message.get("session")))
        if session is None:
            return
        if op == "damaged":
            block, text = message.get("block"), message.get("message")
            if isinstance(block, int) and isinstance(text, str):
                session.damaged(block, text)
        elif op == "ended":
            del self.sessions[session.session_id]
            count = message.get("bytes")
            if isinstance(count, int):
                session.bytes_read = count
            reason = message.get("reason")
            session.remote_ended(reason if isinstance(reason, str) else "")

    def _closed(self) -> None:
        """The channel is gone: the process ended or is stopped; its sessions with it."""
        for report in self._reports.values():
            if not report.done():
                report.set_result(None)
        self._reports.clear()
        process, self.process = self.process, None
        if process is not None and process.returncode is None and not self.pool.closing:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        if self.stalled:  # its stuck threads ended with it
            recovered, self.stalled = dict.fromkeys(self.stalled, False), set()
            self.pool.on_stalls(f"worker {self.number}", recovered)
        ended = list(self.sessions.values())
        self.sessions.clear()
        for session in ended:
            session.remote_ended("its stream worker ended")
        self.pool.worker_ended(self, len(ended))


class Workers:
    """The stream workers of one pvsd; owned by its StreamServer."""

    def __init__(
        self, config: Config, on_stats: Callable[[object, object], None],
        on_stalls: Callable[[str, dict[Path, bool]], None],
    ) -> None:
        """``on_stats(buckets, sums)`` hears the request latencies workers took
        (`pvsd.metrics.RequestStats.add`); ``on_stalls(where, {store: stalled})`` hears the
        stores a worker finds stalled or answering again."""
        self.config = config
        self.on_stats = on_stats
        self.on_stalls = on_stalls
        self.workers = [Worker(self, number) for number in range(1, config.stream_workers + 1)]
        self.closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await asyncio.gather(*(worker.start() for worker in self.workers))
        ticking = asyncio.ensure_future(self._tick())
        self._tasks.add(ticking)

    async def _tick(self) -> None:
        """Tell every worker pvsd is alive (see the module's docstring)."""
        while True:
            for worker in self.workers:
                worker.send({"op": "tick"})
            await asyncio.sleep(self.config.heartbeat_interval)

    async def refresh(self) -> None:
        """Bring every session's figures up to date (bounded: a worker that does not answer
        in ``REPORT_TIMEOUT`` is not waited for)."""
        reports = [worker.report() for worker in self.workers if worker.up]
        if reports:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_TIMEOUT):
                    await asyncio.gather(*reports)

    def choose(self) -> Worker | None:
        """The worker up with the fewest sessions, or None (the session stays here)."""
        up = [worker for worker in self.workers if worker.up]
        return min(up, key=lambda w: len(w.sessions)) if up else None

    def worker_ended(self, worker: Worker, sessions: int) -> None:
        if self.closing:
            return
        log.error(
            "stream_worker_ended", worker=worker.number, sessions=sessions,
            action="its targets fail over to other servers; a new worker is started. Look "
            "for its last messages above",
        )
        task = asyncio.ensure_future(self._restart(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, worker: Worker) -> None:
        await asyncio.sleep(RESTART_DELAY)
        if not self.closing:
            try:
                await worker.start()
            except OSError as error:
                log.error("stream_worker_start_failed", worker=worker.number, error=str(error))
                self.worker_ended(worker, 0)

    async def close(self) -> None:
        """Stop every worker (their sessions have moved or been closed already)."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        processes = [w.process for w in self.workers if w.process is not None]
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.close()  # the worker ends at end of file
        for process in processes:
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def _int(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return -1
