"""Serving a logged-in target's requests: what pvsd's sessions (`pvsd.session`) and its stream
workers' (`pvsd.stream_worker`) do alike.

Reads are served on the event loop when the page cache has the data (``RWF_NOWAIT`` makes the
kernel say so instead of blocking); only a read that would wait on the disk goes to a thread.
A thread hop costs more than a cached 4 KiB read, so doing it for every request would cap
small-read IOPS far below what the clients can ask for.

Threads come from the process's serving pool (`ServingIO`, ``io_threads``), never from the pool
that hashes and scrubs, so background work cannot make a target's read wait. A request still in
its thread after ``stall_timeout`` is answered at once with a retryable IO_ERROR and its late
result dropped: a store that does not answer (a hung disk, an NFS share gone) sends its targets
elsewhere instead of holding them. `ServingIO` records each thread against its store until the
thread returns, and says when a store stalls and recovers (`pvsd.stalls`): pvsd withdraws a
stalled store's replicas from the site, whichever of its processes found it stalled.

Flow control: a session stops reading requests while its transport holds more than its
high-water mark (``pause_writing``), or while its process's reply budget is spent and it holds
much of it (`pvsd.budget`); requests then wait in the receive buffer, bounded by TCP.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pvs_protocol import events as ev
from pvs_protocol.buffers import BufferPool
from pvs_protocol.connection import Connection
from pvs_protocol.errors import ErrorCode, ProtocolError
from pvsd.metrics import RequestStats
from pvsd.replies import Replies
from pvsd.stalls import StallTracker, Transition

_P = ParamSpec("_P")
_T = TypeVar("_T")

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


class ServingIO:
    """A process's serving threads, and which of its stores do not answer."""

    def __init__(
        self, threads: int, stall_timeout: float, changed: Callable[[Path, bool], None],
        name: str = "pvsd-io",
    ) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        """Serving I/O only (reads that miss the page cache, writes, fdatasync)."""
        self.stall_timeout = stall_timeout
        self._stalls = StallTracker()
        self._changed = changed
        """Called with (store, True) when a store stalls here, (store, False) when it
        answers again."""

    async def run(
        self, store: Path, function: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Blocking file work, in the serving pool, recorded against its store until the
        thread returns (not until the caller stops waiting: a cancelled wait does not stop a
        thread stuck in the kernel)."""
        loop = asyncio.get_running_loop()
        token = self._stalls.started(store)
        future = self.pool.submit(function, *args, **kwargs)
        timer = loop.call_later(self.stall_timeout, self._overdue, token, store)

        def returned(_done: Future[_T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process exits
                loop.call_soon_threadsafe(self._returned, token, store, timer)

        future.add_done_callback(returned)
        return await asyncio.wrap_future(future)

    def stalled(self, store: Path) -> bool:
        return self._stalls.stalled(store)

    def waiting(self, store: Path) -> int:
        """Requests of ``store`` still in threads."""
        return self._stalls.waiting(store)

    def close(self) -> None:
        """At exit: threads stuck on a store that does not answer are not waited for."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _overdue(self, token: int, store: Path) -> None:
        if self._stalls.overdue(token) is Transition.STALLED:
            self._changed(store, True)

    def _returned(self, token: int, store: Path, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if self._stalls.finished(token) is Transition.RECOVERED:
            self._changed(store, False)


@dataclasses.dataclass(slots=True)
class _Offloaded:
    """A request handed to a thread, until the thread returns."""

    request_id: int
    what: str
    since: float = 0.0
    """When its request arrived (monotonic): its latency, for pvsd.metrics."""
    timer: asyncio.TimerHandle | None = None
    answered: bool = False
    """Answered already (with IO_ERROR, the store being stalled): the late result is dropped,
    since the state machine closes a request on its first answer and the target may have
    reused the id."""


class ServedSession(asyncio.Protocol, abc.ABC):
    """One target's connection as served: its request loop, flow control, reads, requests in
    threads and idle timer. Subclasses say what the requests are (``_handle``), which image a
    read may use (``_readable``) and how replies leave (``send``, ``close``)."""

    conn: Connection
    replies: Replies
    _log: Any

    def __init__(
        self, io: ServingIO, buffers: BufferPool, requests: RequestStats, idle_timeout: float,
    ) -> None:
        self._io = io
        self._buffers = buffers
        self._requests = requests
        self._idle_timeout = idle_timeout
        self.transport: asyncio.Transport | None = None
        self.bytes_read = 0
        self.last_heard = time.monotonic()
        self._paused = False
        """Requests are not read: the transport's buffer is full, or the process's reply
        budget is spent and this session holds much of it (see pvsd.budget)."""
        self._write_paused = False
        self._budget_paused = False
        self._pending: dict[asyncio.Future[ev.Event], _Offloaded] = {}
        """Requests in threads. They are not cancelled when the connection ends (a thread
        cannot be stopped): what they hold (a writer's lock) is kept until they return."""
        self._timer: asyncio.TimerHandle | None = None
        self._unchanged = False
        """The image was looked at in this burst of requests and not written since login."""
        self._reads = 0
        """Reads answered from the page cache in this burst (their latency: pvsd.metrics)."""

    # -- what each kind of session says (pvsd.session.Session, its workers' WorkerSession) ----

    @abc.abstractmethod
    def send(self, event: ev.Event) -> None:
        """Send ``event`` to the target (or to the process that now serves it)."""

    @abc.abstractmethod
    def close(self, code: int = 0, message: str = "") -> None:
        """Say GOODBYE and close once the replies buffered are written."""

    @abc.abstractmethod
    def _handle(self, event: ev.Event) -> None:
        """One whole frame from the target."""

    @abc.abstractmethod
    def _readable(self, request_id: int, offset: int, length: int) -> int | None:
        """The image descriptor a request for these bytes may use, or None (refused: said
        to the target already)."""

    @abc.abstractmethod
    def _store(self) -> Path:
        """The store of this session's image (what a stall is recorded against)."""

    @abc.abstractmethod
    def _vdisk_name(self) -> str:
        """For the messages that name the vDisk."""

    def _store_stalled(self) -> bool:
        """Whether the store of this session's image is known not to answer."""
        return self._io.stalled(self._store())

    def _threads_done(self) -> None:
        """The connection ended and the last of its requests in threads has returned."""

    # -- the request loop -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def _process(self) -> None:
        """Handle every whole frame received, unless the target is not reading our replies:
        then requests wait in the receive buffer (bounded by TCP) until it catches up."""
        self.replies.burst()
        self._unchanged = False  # look at the image again for this burst
        started = time.monotonic()
        try:
            while self.transport is not None and not self.transport.is_closing():
                if self._paused:
                    return
                event = self.conn.next_event()
                if event is ev.NEED_DATA:
                    break
                assert not isinstance(event, ev.NeedData)
                self.last_heard = time.monotonic()  # whole frames only keep a session alive
                self._handle(event)
        except ProtocolError as error:
            self._log.warning("protocol_error", code=error.code.name, error=error.message)
            self.close(error.code, error.message)
        finally:
            self.replies.flush()
            if self._reads:
                self._requests.reads(time.monotonic() - started, self._reads)
                self._reads = 0

    # -- flow control -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        # The target reads slower than we answer: stop taking requests until it catches up.
        self._write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    def budget_pause(self) -> None:
        """The process's reply budget is spent and this session holds much of it."""
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

    # -- reads ------------------------------------------------------------------------------

    def _read(self, read: ev.Read) -> None:
        fd = self._readable(read.request_id, read.offset, read.length)
        if fd is None:
            return
        buffer = self._buffers.take(read.length)
        try:
            got = os.preadv(fd, [buffer], read.offset, _NOWAIT)
        except BlockingIOError:
            got = 0
        except OSError as error:
            self._io_failed(read.request_id, "read", error)
            return
        if got == read.length:
            self.bytes_read += got
            self.send(ev.ReadData(read.request_id, buffer))
            self._reads += 1
        elif not self._refused_stalled(read.request_id, "read"):
            self._offload(read.request_id, "read", self._read_rest(fd, buffer, read, got))

    async def _read_rest(self, fd: int, buffer: bytearray, read: ev.Read, got: int) -> ev.Event:
        """Finish a read that would block, in a serving thread: the loop stays free."""
        store = self._store()
        view = memoryview(buffer)
        while got < len(buffer):
            count = await self._io.run(store, os.preadv, fd, [view[got:]], read.offset + got)
            if count == 0:
                raise OSError(
                    0, "image is shorter than its identity says (truncated while served?)"
                )
            got += count
        return ev.ReadData(read.request_id, buffer)

    def _refused_stalled(self, request_id: int, what: str) -> bool:
        """Answer a request that needs the disk at once while its store is stalled: another
        thread would only wait behind the stuck ones, and the target should move now."""
        if not self._store_stalled():
            return False
        self.send(ev.Error(request_id, ErrorCode.IO_ERROR, self._stalled_message(what)))
        return True

    def _stalled_message(self, what: str) -> str:
        return (
            f"{what} of {self._vdisk_name()}: the store of this server is not answering "
            "(stalled I/O): log in at another server"
        )

    def _request_error(self, request_id: int, code: ErrorCode, message: str) -> None:
        self._log.warning("request_refused", request=request_id, code=code.name, error=message)
        self.send(ev.Error(request_id, code, message))

    def _io_failed(self, request_id: int, what: str, error: OSError) -> None:
        self._log.error(
            "io_error", request=request_id, op=what, error=str(error),
            hint=f"check the image of {self._vdisk_name()} and the disk it lives on",
        )
        self.send(ev.Error(request_id, ErrorCode.IO_ERROR, f"{what} failed on the server: {error}"))

    # -- requests in threads ----------------------------------------------------------------

    def _offload(self, request_id: int, what: str, work: Coroutine[Any, Any, ev.Event]) -> None:
        """Run blocking file work in a thread; the session owns it until the thread returns.
        Not answered within the stall timeout, it is answered with IO_ERROR then."""
        task = asyncio.ensure_future(work)
        offloaded = self._pending[task] = _Offloaded(request_id, what, time.monotonic())
        offloaded.timer = asyncio.get_running_loop().call_later(
            self._io.stall_timeout, self._overdue, task
        )
        task.add_done_callback(self._offload_done)

    def _overdue(self, task: asyncio.Future[ev.Event]) -> None:
        offloaded = self._pending.get(task)
        if offloaded is None or task.done() or offloaded.answered:
            return
        offloaded.answered = True
        self._log.warning(
            "request_stalled", request=offloaded.request_id, op=offloaded.what,
            seconds=self._io.stall_timeout, store=str(self._store()),
            hint="answered with IO_ERROR so that the target moves; the store does not answer",
        )
        self.send(ev.Error(offloaded.request_id, ErrorCode.IO_ERROR,
                           self._stalled_message(offloaded.what)))

    def _offload_done(self, task: asyncio.Future[ev.Event]) -> None:
        offloaded = self._pending.pop(task)
        if offloaded.timer is not None:
            offloaded.timer.cancel()
        if self.transport is None and not self._pending:
            self._threads_done()
        if task.cancelled() or offloaded.answered:
            if offloaded.answered and not task.cancelled() and task.exception() is None:
                self._log.info("late_result_dropped", request=offloaded.request_id,
                               op=offloaded.what)
            return
        request_id, what = offloaded.request_id, offloaded.what
        error = task.exception()
        if isinstance(error, OSError):
            self._io_failed(request_id, what, error)
        elif error is not None:
            self._log.error("internal_error", request=request_id, op=what, error=repr(error))
            self.send(ev.Error(request_id, ErrorCode.INTERNAL, f"{what}: internal error"))
        else:
            reply = task.result()
            if isinstance(reply, ev.ReadData):
                self.bytes_read += len(reply.data)
            self.send(reply)
            self._requests.observe(what, time.monotonic() - offloaded.since)

    # -- the idle timer ---------------------------------------------------------------------

    def _arm_timer(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._on_timer)

    def _on_timer(self) -> None:
        idle = time.monotonic() - self.last_heard
        limit = self._idle_timeout
        if idle >= limit:
            self._log.warning("idle_timeout", seconds=round(idle, 1))
            self.close(ErrorCode.TIMEOUT, f"nothing received for {limit:.0f} s")
        else:
            self._arm_timer(limit - idle)
