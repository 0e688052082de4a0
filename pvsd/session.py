"""One target's connection to this server: handshake, login, then block requests (served as
`pvsd.serving` says: reads from the page cache on the loop, the rest in threads, a stalled
store's requests answered with IO_ERROR), or handed to a stream worker (`pvsd.workers`).

Replies are copied from the page cache into a buffer and written with ``writelines``, not sent
with ``sendfile``, although a read-only session's replies carry no CRC-32 any more (its target
checks every block against the manifest): uvloop has no ``loop.sendfile``, and on this machine
one loopback stream carried 2,180 MB/s with ``os.sendfile`` against 4,095 MB/s with read and
send, at more sender CPU per GiB (``bench/sendfile.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from pvs_protocol import events as ev
from pvs_protocol.buffers import Lent
from pvs_protocol.connection import Connection, Phase, Role, negotiate
from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode
from pvsd import locks
from pvsd.config import format_address
from pvsd.identity import content_key
from pvsd.manifest import ManifestFile, write_and_record
from pvsd.metrics import requests_of
from pvsd.names import InvalidName, validate_name
from pvsd.replies import Replies, digest_page
from pvsd.serving import ServedSession

if TYPE_CHECKING:
    from pvsd.server import StreamServer
    from pvsd.store import ImageFile, VDisk
    from pvsd.workers import Worker

log = structlog.get_logger("pvsd.session")

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
HAND_OVER_TRIES = 20
"""Loop turns to wait for a LOGIN_OK still in the transport's buffer before a session goes to
a stream worker; past them it is served here (its socket is full: a slow reader anyway)."""
DAMAGE_REPORTS = 4
DAMAGE_WINDOW = 10.0
"""At most this many DAMAGED reports per session in this many seconds are acted upon: each
costs a read here, and a lying target must not make the server re-read without end."""


class Session(ServedSession):
    """Protocol handler for one target connection; owned and tracked by the StreamServer."""

    def __init__(self, server: StreamServer) -> None:
        config = server.config
        super().__init__(server.serving, server.buffers, requests_of(server), config.idle_timeout)
        self.server = server
        self.conn = Connection(Role.SERVER, screen=self._screen_write)
        self.session_id = 0
        self.device_id = ""
        self.vdisk: VDisk | None = None
        self.peer = ""
        self.peer_ip = ""
        self.local_address = ""
        self.since = time.time()
        self.pinned_login = False
        """The login carried a pinned identity: the target moved here, it did not boot."""
        self.bytes_written = 0
        self._log = log
        self._login_task: asyncio.Task[None] | None = None
        self.identity: ReplicaIdentity | None = None
        self.image: ImageFile | None = None
        self.manifest: ManifestFile | None = None
        """The manifest pinned at login (a Private Image's writer uses the vDisk's own)."""
        self._damage_reports: list[float] = []
        self._stat_at_login: tuple[int, int, int] = (0, 0, 0)
        self.replies = Replies(self.conn)
        self.write_fd: int | None = None
        """Open only for the one writer of a Private Image vDisk."""
        self._closed = asyncio.get_running_loop().create_future()
        self.remote: Worker | None = None
        """The stream worker serving this session (`pvsd.workers`); this object stands in
        for it here: counted, listed, told to move or close."""
        self._hand_over_tries = 0

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peername = transport.get_extra_info("peername")
        self.peer = _address(peername)
        self.peer_ip = str(peername[0]) if isinstance(peername, tuple) else ""
        self.local_address = _address(transport.get_extra_info("sockname"))
        self._log = log.bind(peer=self.peer)
        self.replies.attach(self.transport)
        refusal = self.server.register(self)
        if refusal is not None:  # too many connections from its address
            self.close(ErrorCode.BUSY, refusal)
            return
        self.transport.set_write_buffer_limits(high=4 * self.server.config.max_request)
        self.replies.lent = Lent(  # the transport may hold up to its high-water mark, and a burst
            self.server.buffers.give, self.transport, asyncio.get_running_loop(),
            limit=8 * self.server.config.max_request, unsent=self._unsent,
        )
        self._arm_timer(self.server.config.handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._login_task is not None:
            self._login_task.cancel()
        self.replies.detach()
        self.transport = None
        if self.remote is None:
            self._ended(str(exc) if exc else "closed by target")

    def _ended(self, reason: str) -> None:
        self.server.unregister(self)
        self._requests.session_ended(self)
        if self.write_fd is not None and self.vdisk is not None:
            if self._pending:
                self.server.lingering_writers.add(self.session_id)
                self._log.warning(
                    "writer_release_deferred", in_threads=len(self._pending),
                    hint="writes of this target are still in worker threads (the store does "
                    "not answer?): its writer lock is kept until they return",
                )
            else:
                self._release_writer()
        if self.conn.phase is not Phase.CLOSED:
            self._log.info("target_disconnected", reason=reason, in_flight=self.conn.outstanding)
        if not self._closed.done():
            self._closed.set_result(None)

    def _release_writer(self) -> None:
        if self.write_fd is None or self.vdisk is None:
            return
        os.close(self.write_fd)
        self.write_fd = None
        locks.release(self.vdisk.path, self.session_id)
        self.server.lingering_writers.discard(self.session_id)
        # The digests of every landed write are in the manifest file already (durable
        # once a FLUSH was answered); the identity follows its root.
        self.server.catalog.writer_left(self.vdisk, self.session_id)

    def _unsent(self, size: int) -> None:
        """What the transport holds (see ``Lent``), for the server's reply budget."""
        self.server.replies_unsent(self, size)

    # -- public -----------------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        return self.conn.phase is Phase.STREAMING

    def send(self, event: ev.Event) -> None:
        if self.remote is not None:
            self._send_remote(event)
        else:
            self.replies.send(event, self._log)

    def close(self, code: int = 0, message: str = "") -> None:
        """Say GOODBYE (where the phase allows) and close once buffered replies are written."""
        if self.remote is not None:
            self.remote.send({"op": "close", "session": self.session_id, "code": int(code),
                              "message": message})
            return
        if self.transport is None:
            return
        if self.conn.phase is not Phase.CLOSED:
            self.send(ev.Goodbye(code, message))
        self.replies.flush()
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection without a word (a target that did not leave in time)."""
        if self.remote is not None:
            self.remote.send({"op": "abort", "session": self.session_id})
        elif self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await self._closed

    # -- served by a stream worker (pvsd.workers) -------------------------------------------

    def _hand_over(self) -> None:
        """Give this logged-in read-only session to a stream worker, once the LOGIN_OK has
        left and nothing of the connection is in flight here (reading is paused from the
        login on, so no request can arrive here meanwhile)."""
        transport, image, manifest = self.transport, self.image, self.manifest
        if transport is None or transport.is_closing() or image is None or manifest is None:
            return
        worker = self.server.workers.choose() if self.server.workers is not None else None
        if worker is None or not self.conn.idle or self._hand_over_tries >= HAND_OVER_TRIES:
            transport.resume_reading()  # served here
            return
        if transport.get_write_buffer_size():
            self._hand_over_tries += 1
            asyncio.get_running_loop().call_later(0.005, self._hand_over)
            return
        sock = transport.get_extra_info("socket")
        vdisk = self.vdisk
        assert vdisk is not None
        worker.adopt(self, [sock.fileno(), image.fd, manifest.fd], {
            "vdisk": vdisk.name, "size": vdisk.size, "stat": list(self._stat_at_login),
            "manifest": str(manifest.path), "store": str(vdisk.store.path),
            "max_request": self.conn.max_request,
            "max_in_flight": self.conn.max_in_flight, "checksum": int(self.conn.checksum),
            "peer": self.peer, "device": self.device_id,
        })
        self.remote = worker
        if self._timer is not None:  # the worker watches for an idle target now
            self._timer.cancel()
            self._timer = None
        self._log.info("session_handed_over", worker=worker.number)
        transport.abort()  # our descriptor only: the worker holds the connection now

    def _send_remote(self, event: ev.Event) -> None:
        assert self.remote is not None
        match event:
            case ev.Relogin(deadline_ms, message, servers):
                self.remote.send({"op": "relogin", "session": self.session_id,
                                  "deadline_ms": deadline_ms, "message": message,
                                  "servers": list(servers)})
            case ev.SiteUpdate(servers):
                self.remote.send({"op": "site", "session": self.session_id,
                                  "servers": list(servers)})
            case ev.Goodbye(code, message):
                self.close(code, message)
            case _:
                self._log.error("internal_error", error=f"{type(event).__name__} for a session "
                                "a stream worker serves")

    def check_replica(self) -> None:
        """The catalog changed this session's replica: a worker serving it stops serving it
        as a session here would (see ``_readable``)."""
        vdisk = self.vdisk
        if self.remote is None or vdisk is None:
            return
        if self._withdrawn(vdisk):
            self.remote.send({
                "op": "invalid", "session": self.session_id,
                "message": f"replica of {vdisk.name} here is damaged or changed since login: "
                "log in again",
            })

    def _withdrawn(self, vdisk: VDisk) -> bool:
        """The replica logged in to is damaged now, or no longer the one served here."""
        return (vdisk.damage is not None or vdisk.identity != self.identity
                or vdisk.manifest is not self.manifest)

    def remote_ended(self, reason: str) -> None:
        """The worker's connection to the target ended."""
        self.remote = None
        self._ended(reason)

    def damaged(self, block: int, message: str) -> None:
        """A DAMAGED report the worker relayed."""
        if self.vdisk is not None:
            self._damaged(block, message)

    # -- events -----------------------------------------------------------------------------

    def _handle(self, event: ev.Event) -> None:
        match event:
            case ev.Read():
                self._read(event)
            case ev.Write():
                self._write(event)
            case ev.Flush():
                self._flush(event)
            case ev.Digests():
                self._digests(event)
            case ev.Damaged(block, message):
                self._damaged(block, message)
            case ev.Keepalive(token, reply=False):
                self.send(ev.Keepalive(token, reply=True))
            case ev.Keepalive():
                pass
            case ev.Hello():
                config = self.server.config
                self.send(
                    negotiate(
                        event, max_request=config.max_request,
                        max_in_flight=config.max_in_flight, server_name=config.name,
                    )
                )
            case ev.Login():
                self._login(event)
            case ev.Error(request_id, code, message):  # a WRITE _screen_write refused
                self._request_error(request_id, code, message)
            case ev.Goodbye(code, message):
                self._log.info("target_said_goodbye", code=code, message=message)
                self.replies.flush()
                if self.transport is not None:
                    self.transport.close()

    def _login(self, login: ev.Login) -> None:
        try:
            validate_name(login.vdisk)
        except InvalidName as error:
            self._refuse(ErrorCode.BAD_NAME, str(error), login)
            return
        if not login.device_id or len(login.device_id) > 128:
            self._refuse(ErrorCode.BAD_NAME, "device id must be 1..128 characters", login)
            return
        holder = self.server.lock_holder_to_probe(login)
        if holder is not None and self._login_task is None:
            # A Private Image locked through another server: find out (without blocking the
            # loop) whether that server crashed before answering; LOGIN is one at a time.
            self._login_task = asyncio.ensure_future(self._login_after_probe(login, holder))
            return
        self._place(login)

    async def _login_after_probe(self, login: ev.Login, holder: locks.Owner) -> None:
        try:
            await self.server.probe_lock_holder(holder)
        finally:
            self._login_task = None
        if self.transport is None or self.transport.is_closing():
            return
        self.replies.burst()
        try:
            self._place(login)
        finally:
            self.replies.flush()

    def _place(self, login: ev.Login) -> None:
        decision = self.server.place(login, self)
        if isinstance(decision, ev.Error | ev.Redirect):
            if isinstance(decision, ev.Error):
                self._refuse(decision.code, decision.message, login)
            else:
                self._log.info(
                    "login_redirected", device=login.device_id, vdisk=login.vdisk,
                    to=decision.server_name, address=decision.address, reason=decision.reason,
                )
                self.send(decision)
                self.replies.flush()
                assert self.transport is not None
                self.transport.close()
            return
        vdisk, reply = decision
        manifest = vdisk.manifest
        if manifest is None or manifest.identity != reply.identity:
            if vdisk.mode is Mode.private:
                locks.release(vdisk.path, reply.session_id)
            self._refuse(ErrorCode.IDENTITY_PENDING,
                         f"{vdisk.name} is being checked: retry in a few seconds", login)
            return
        if vdisk.mode is Mode.private:  # we hold its writer lock now
            try:
                manifest.open_for_writing()
                self.write_fd = os.open(vdisk.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as error:
                locks.release(vdisk.path, reply.session_id)
                self._refuse(ErrorCode.IO_ERROR, f"cannot open {vdisk.name} for writing: "
                             f"{error.strerror}; check the image file's permissions", login)
                return
            if manifest.identity != reply.identity:  # another server's writer wrote it since
                reply = dataclasses.replace(reply, identity=manifest.identity)
                self.server.catalog.wrote(vdisk, manifest.identity, tell=True)
        self.vdisk, self.device_id, self.session_id = vdisk, login.device_id, reply.session_id
        self.pinned_login = login.pinned is not None  # a move, not a boot (pvsd.rebalance)
        self.identity = reply.identity
        self.image = vdisk.file
        self.manifest = manifest
        if self.write_fd is not None:
            vdisk.writer = reply.session_id
        self._stat_at_login = (vdisk.stat.size, vdisk.stat.mtime_ns, vdisk.stat.ctime_ns)
        self._log = self._log.bind(device=login.device_id, vdisk=vdisk.name)
        self.send(reply)
        self.server.targets_changed()
        self._arm_timer(self.server.config.idle_timeout)
        if self.write_fd is None and self.server.workers is not None \
                and self.transport is not None:
            self.transport.pause_reading()  # what the target sends next is the worker's
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._log.info(
            "target_logged_in", session=f"{reply.session_id:016x}",
            identity=reply.identity.short, redirected=login.redirected,
        )

    def _refuse(self, code: ErrorCode, message: str, login: ev.Login) -> None:
        self._log.warning(
            "login_refused", device=login.device_id, vdisk=login.vdisk, code=code.name,
            error=message,
        )
        self.send(ev.Error(0, code, message))

    def _readable(self, request_id: int, offset: int, length: int) -> int | None:
        vdisk, image = self.vdisk, self.image
        assert vdisk is not None and image is not None
        if offset + length > vdisk.size:
            self._request_error(
                request_id, ErrorCode.OUT_OF_RANGE,
                f"bytes {offset}..{offset + length} lie past the end of {vdisk.name} "
                f"({vdisk.size} bytes)",
            )
            return None
        if vdisk.damage is not None:
            self._request_error(
                request_id, ErrorCode.NO_IDENTICAL_REPLICA,
                f"replica of {vdisk.name} here is damaged (it does not match its manifest): "
                "log in again, elsewhere",
            )
            return None
        if self.write_fd is None and (
            vdisk.identity != self.identity or self._changed_since_login(image)
        ):
            self._request_error(
                request_id, ErrorCode.NO_IDENTICAL_REPLICA,
                f"replica of {vdisk.name} changed since login: log in again",
            )
            return None
        return image.fd

    def _changed_since_login(self, image: ImageFile) -> bool:
        """Whether the image was written since login, before the store's poll notices: a
        session must never get bytes of another replica. Checked once per burst of requests
        (one fstat for all the reads that arrived together), since at deep queues a per-read
        fstat cost more than the read itself."""
        if not self._unchanged:
            self._unchanged = content_key(image.fd) == self._stat_at_login
        return not self._unchanged

    def _store(self) -> Path:
        assert self.vdisk is not None
        return self.vdisk.store.path

    def _vdisk_name(self) -> str:
        return self.vdisk.name if self.vdisk is not None else "?"

    def _store_stalled(self) -> bool:
        return self.server.store_stalled(self._store())  # by pvsd or by a stream worker

    def _threads_done(self) -> None:
        self._release_writer()  # the connection ended while writes were in threads

    def _screen_write(self, request_id: int, offset: int, length: int) -> ev.Error | None:
        """Refuse a WRITE this session cannot serve as soon as its header and offset are in,
        before a byte of its data is kept: on a read-only session, announcing 4 MiB writes
        must not make the server allocate 4 MiB for each (its data is dropped unread)."""
        vdisk = self.vdisk
        if vdisk is None:
            return None
        if self.write_fd is None:
            return ev.Error(
                request_id, ErrorCode.READ_ONLY,
                f"{vdisk.name} is a Standard Image: writes belong in the target's write cache",
            )
        if offset + length > vdisk.size:
            return ev.Error(
                request_id, ErrorCode.OUT_OF_RANGE,
                f"bytes {offset}..{offset + length} lie past the end of {vdisk.name} "
                f"({vdisk.size} bytes)",
            )
        return None

    def _write(self, write: ev.Write) -> None:
        if self._readable(write.request_id, write.offset, len(write.data)) is None:
            return
        if self.write_fd is None:
            name = self.vdisk.name if self.vdisk else "?"
            self._request_error(
                write.request_id, ErrorCode.READ_ONLY,
                f"{name} is a Standard Image: writes belong in the target's write cache",
            )
            return
        if self._refused_stalled(write.request_id, "write"):
            return
        self.bytes_written += len(write.data)
        self._offload(write.request_id, "write", self._write_recorded(self.write_fd, write))

    async def _write_recorded(self, fd: int, write: ev.Write) -> ev.Event:
        """Write, then record the new digests of the blocks touched (in a worker thread);
        the identity follows the new root."""
        vdisk, manifest = self.vdisk, self.manifest
        assert vdisk is not None and manifest is not None
        identity = await self._io.run(
            self._store(), write_and_record, fd, manifest, write.offset, write.data
        )
        if vdisk.manifest is manifest:
            self.server.catalog.wrote(vdisk, identity)
        return ev.Done(write.request_id)

    def _flush(self, flush: ev.Flush) -> None:
        if self.write_fd is None:
            self.send(ev.Done(flush.request_id))  # nothing of ours is unwritten
            self._requests.observe("flush", time.monotonic() - self.last_heard)
            return
        if self._refused_stalled(flush.request_id, "flush"):
            return
        self._offload(flush.request_id, "flush", self._sync(self.write_fd, flush.request_id))

    async def _sync(self, fd: int, request_id: int) -> ev.Event:
        """The data, then the manifest entries that describe it: durable before DONE."""
        vdisk, manifest = self.vdisk, self.manifest
        store = self._store()
        await self._io.run(store, os.fdatasync, fd)
        if manifest is not None:
            await self._io.run(store, manifest.sync)
            if vdisk is not None and vdisk.manifest is manifest:
                self.server.catalog.wrote(vdisk, manifest.identity, tell=True)
        return ev.Done(request_id)

    def _digests(self, request: ev.Digests) -> None:
        """A page of the manifest tree pinned at login, read from the manifest file."""
        vdisk, manifest = self.vdisk, self.manifest
        assert vdisk is not None
        if self.write_fd is None and self._withdrawn(vdisk):
            self._request_error(
                request.request_id, ErrorCode.NO_IDENTICAL_REPLICA,
                f"replica of {vdisk.name} here is damaged or changed since login: log in again",
            )
            return
        if manifest is None:
            self._request_error(request.request_id, ErrorCode.IDENTITY_PENDING,
                                f"{vdisk.name} has no manifest loaded yet")
            return
        try:
            page = digest_page(manifest, request)
        except OSError as error:
            self._io_failed(request.request_id, "digests", error)
            return
        if isinstance(page, str):
            self._request_error(request.request_id, ErrorCode.OUT_OF_RANGE, page)
            return
        self.send(ev.ReadData(request.request_id, page))
        self._requests.observe("digests", time.monotonic() - self.last_heard)

    def _damaged(self, block: int, message: str) -> None:
        """A target found a block of ours that does not match the manifest: have it read
        again here (the catalog withdraws the replica if it agrees)."""
        vdisk = self.vdisk
        assert vdisk is not None
        now = time.monotonic()
        recent = [t for t in self._damage_reports if now - t < DAMAGE_WINDOW]
        self._damage_reports = recent
        if len(recent) >= DAMAGE_REPORTS:
            self._log.warning("damage_report_dropped", block=block,
                              hint="this target reports damage too often; its reports are "
                              "ignored for a while")
            return
        recent.append(now)
        started = self.server.catalog.report_damage(vdisk, block, reporter=self.peer)
        self._log.warning(
            "damage_reported", block=block, message=message[:200], rechecking=started,
            hint="the block is read again here: if it does not match, the replica is withdrawn",
        )

    # -- timers -----------------------------------------------------------------------------

    def _on_timer(self) -> None:
        if self.conn.phase in (Phase.HELLO, Phase.LOGIN):
            self._log.warning(
                "handshake_timeout", seconds=self.server.config.handshake_timeout,
                hint="the peer connected but did not complete HELLO and LOGIN",
            )
            self.close(ErrorCode.TIMEOUT, "handshake not completed in time")
            return
        super()._on_timer()


def _address(name: object) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        return format_address(str(name[0]), int(name[1]))
    return str(name)


def new_session_id() -> int:
    return secrets.randbits(63) | 1
