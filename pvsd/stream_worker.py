"""A stream worker process: serves the read-only sessions pvsd hands it (see `pvsd.workers`).

    python -m pvsd.stream_worker --channel FD --name NAME --number N [options]

Each session arrives logged in, with its socket, image and manifest open: the worker answers
READ, DIGESTS, FLUSH and KEEPALIVE under the same protocol rules (`pvs_protocol.connection`,
taken over in the streaming phase), refuses WRITE as any read-only session does, relays
DAMAGED reports to pvsd, and passes on what pvsd says to the target (RELOGIN, SITE, GOODBYE).
Requests are served as pvsd's own sessions serve them (`pvsd.serving`): the page cache on the
loop, what would block in threads, a read still in its thread after ``--stall-timeout``
answered with a retryable IO_ERROR, and the store it waits on reported to pvsd as stalled
until the thread returns (pvsd withdraws its replicas from the site). When pvsd's end of the
channel closes (pvsd exited, or was killed), the worker ends its connections and exits: its
targets fail over as from any server that went away.
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
from pathlib import Path

import structlog

from pvs_protocol import events as ev
from pvs_protocol.buffers import BufferPool, Lent
from pvs_protocol.connection import Connection, Role
from pvs_protocol.errors import ErrorCode
from pvs_protocol.manifest import ManifestError
from pvsd import logs
from pvsd.budget import BudgetKeeper
from pvsd.identity import content_key
from pvsd.manifest import ManifestFile, manifest_of
from pvsd.metrics import RequestStats
from pvsd.replies import Replies, digest_page
from pvsd.serving import ServedSession, ServingIO
from pvsd.workers import Channel, Message

log = structlog.get_logger("pvsd.stream_worker")

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


class WorkerSession(ServedSession):
    """One target's read-only session, from the first request after its login."""

    def __init__(self, worker: StreamWorker, session_id: int, state: Message,
                 image_fd: int, manifest: ManifestFile) -> None:
        super().__init__(worker.io, worker.buffers, worker.requests,
                         worker.settings.idle_timeout)
        self.worker = worker
        self.session_id = session_id
        self.vdisk = str(state["vdisk"])
        self.store = Path(str(state["store"]))
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
        self.peer = str(state.get("peer", ""))
        self._log = log.bind(peer=self.peer, device=state.get("device", ""),
                             vdisk=self.vdisk, session=f"{session_id:016x}")
        self.replies = Replies(self.conn)
        self._closed_why = ""

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        max_request = self.conn.max_request
        self.transport.set_write_buffer_limits(high=4 * max_request)
        self.replies.attach(self.transport, Lent(
            self.worker.buffers.give, self.transport, asyncio.get_running_loop(),
            limit=8 * max_request, unsent=self._unsent,
        ))
        self._arm_timer(self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.replies.detach()
        self.transport = None
        why = self._closed_why or (str(exc) if exc else "closed by target")
        self.worker.ended(self, why)

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
                self._requests.observe("flush", time.monotonic() - self.last_heard)
            case ev.Error(request_id, code, message):  # a WRITE the screen refused
                self._request_error(request_id, code, message)
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

    def _readable(self, request_id: int, offset: int, length: int) -> int | None:
        if offset + length > self.size:
            self._request_error(
                request_id, ErrorCode.OUT_OF_RANGE, f"bytes {offset}..{offset + length} lie "
                f"past the end of {self.vdisk} ({self.size} bytes)",
            )
            return None
        if not self.invalid and not self._unchanged:  # one fstat per burst, as pvsd's sessions
            self._unchanged = content_key(self.image_fd) == self.stat_key
            if not self._unchanged:
                self.invalid = f"replica of {self.vdisk} changed since login: log in again"
        if self.invalid:
            self._request_error(request_id, ErrorCode.NO_IDENTICAL_REPLICA, self.invalid)
            return None
        return self.image_fd

    def _store(self) -> Path:
        return self.store

    def _vdisk_name(self) -> str:
        return self.vdisk

    def _digests(self, request: ev.Digests) -> None:
        if self.invalid:
            self._request_error(request.request_id, ErrorCode.NO_IDENTICAL_REPLICA, self.invalid)
            return
        try:
            page = digest_page(self.manifest, request)
        except OSError as error:
            self._io_failed(request.request_id, "digests", error)
            return
        if isinstance(page, str):
            self._request_error(request.request_id, ErrorCode.OUT_OF_RANGE, page)
            return
        self.send(ev.ReadData(request.request_id, page))
        self._requests.observe("digests", time.monotonic() - self.last_heard)

class StreamWorker:
    """The sessions of this process, and its channel to pvsd."""

    def __init__(self, channel: socket.socket, settings: Settings, io_threads: int) -> None:
        self.settings = settings
        self.budget: BudgetKeeper[WorkerSession] = BudgetKeeper(
            settings.reply_budget, settings.max_request
        )
        self.buffers: BufferPool = BufferPool()
        self.io: ServingIO = ServingIO(io_threads, settings.stall_timeout, self._stall_changed,
                            name="pvsd-worker-io")
        self.sessions: dict[int, WorkerSession] = {}
        self.manifests: dict[tuple[int, ...], tuple[ManifestFile, set[int]]] = {}
        """Loaded manifests by file (device, inode, size, times), with the sessions using
        each: loading one reads the whole file (its leaves are checked against its root), so
        the sessions of one replica share it."""
        self.requests: RequestStats = RequestStats()
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
            self.io.close()

    def channel_send(self, message: Message) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def _stall_changed(self, store: Path, stalled: bool) -> None:
        """A store stalled in this worker's threads, or answers again: pvsd withdraws its
        replicas from the site (and asks their targets to move) as for its own."""
        self.channel_send({"op": "store", "store": str(store), "stalled": stalled})

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
