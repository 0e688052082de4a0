"""Block buffers reused instead of allocated per request, on both sides of a connection.

A fresh 1 MiB ``bytearray`` is zeroed, and its pages faulted in, only to be overwritten by a
read or a receive: on the server that was a third of its time for 1 MiB requests, on the
target more than half (docs/benchmarks.md). A buffer taken here goes back once nothing reads
or writes it any more, which for a reply means once the transport has handed every byte of it
to the kernel. A pool belongs to a process, not to a session, so an idle session holds none.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from typing import Protocol

Buffer = bytes | bytearray | memoryview
DEFAULT_LIMIT = 16 * 1024 * 1024
MIN_SIZE = 64 * 1024
"""Smaller buffers come from malloc cheaply enough; pooling them would cost more than it saves."""


class PoolBuffer(bytearray):
    """A ``bytearray`` that came from a pool: only these are taken back, so giving back
    something that merely looks like one (a write cache's own block) cannot end up shared."""

    __slots__ = ()


class BufferPool:
    """Spare buffers by size, at most ``limit`` bytes in all (the rest is left to the GC).
    A buffer taken and never given back is simply collected."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.held = 0
        self._spare: dict[int, list[PoolBuffer]] = {}

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes; its contents are whatever it held before (zeros when
        new). Below ``MIN_SIZE`` a plain ``bytearray``, never taken back."""
        if size < MIN_SIZE:
            return bytearray(size)
        spare = self._spare.pop(size, None)
        if spare is None:
            return PoolBuffer(size)
        self._spare[size] = spare  # now the size most recently asked for
        if not spare:
            return PoolBuffer(size)
        self.held -= size
        return spare.pop()

    def give(self, buffers: Iterable[object]) -> None:
        """Buffers nobody reads or writes any more (the caller's promise); anything that is
        not a ``PoolBuffer`` is ignored. When full, spares of the sizes least recently asked
        for make room: after a copy in 256 KiB requests, 1 MiB reads must not find the pool
        full of buffers nobody wants."""
        for buffer in buffers:
            if type(buffer) is not PoolBuffer:
                continue
            size = len(buffer)
            if size > self.limit:
                continue
            while self.held + size > self.limit:
                self._evict(size)
            self._spare.setdefault(size, []).append(buffer)
            self.held += size

    def _evict(self, keep: int) -> None:
        for size, spare in self._spare.items():  # least recently asked for first
            if spare and size != keep:
                spare.pop()
                self.held -= size
                return
        spare = self._spare[keep]  # only buffers of this size are left
        spare.pop()
        self.held -= keep


class _Transport(Protocol):
    def get_write_buffer_size(self) -> int: ...


CHECK_INTERVAL = 0.01
CHECK_INTERVAL_MAX = 0.16
"""While a transport holds bytes it is looked at every 10 ms, then less often (up to every
160 ms) while nothing changes: a peer that never reads costs a few checks a second, not 100."""


class Lent:
    """Pool buffers written to one transport, given back (``give``: a pool's or a backend's)
    as soon as the transport has handed them to the kernel; and, for a server-wide budget,
    how many bytes the transport still holds (``unsent``).

    A transport writes in order and ``get_write_buffer_size`` says how much it still holds,
    so with every byte written counted here, a buffer whose last byte lies before that tail
    is free: uvloop keeps a reference to what it could not send at once, not a copy. This is
    looked at on the loop turn after a write (uvloop writes at the end of a turn), and every
    10 ms while buffers remain. At most ``limit`` bytes are remembered; older ones are left
    to the GC, so a peer that stops reading costs no more memory than without a pool.

    ``unsent(size)``, when given, hears the bytes the transport holds: at each write what it
    held at the last look plus what was written since (uvloop keeps all of it until the end of
    the loop turn), and at each look the real figure when it changed; the transport is looked
    at again while it holds anything.
    """

    def __init__(
        self, give: Callable[[list[object]], None], transport: _Transport,
        loop: asyncio.AbstractEventLoop, limit: int = 8 * 1024 * 1024,
        unsent: Callable[[int], None] | None = None,
    ) -> None:
        self._give = give
        self._transport = transport
        self._loop = loop
        self._limit = limit
        self._total = 0
        self._held: collections.deque[tuple[int, PoolBuffer]] = collections.deque()
        self._bytes = 0
        self._check_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._unsent_to = unsent
        self._unsent = 0
        """What the transport held at the last look."""
        self._since = 0
        """Bytes written since the last look."""
        self._interval = CHECK_INTERVAL

    @property
    def unsent(self) -> int:
        """Bytes the transport held at the last look, plus those written since."""
        return self._unsent + self._since

    @property
    def holding(self) -> int:
        """Bytes of pool buffers remembered until the transport has sent them."""
        return self._bytes

    def wrote(self, buffers: Iterable[Buffer]) -> None:
        """Count what was just written to the transport (every write, in order)."""
        before = self._total
        for buffer in buffers:
            size = len(buffer)
            self._total += size
            if type(buffer) is PoolBuffer:
                self._held.append((self._total, buffer))
                self._bytes += size
        if self._unsent_to is not None:
            self._since += self._total - before
            self._interval = CHECK_INTERVAL
            self._unsent_to(self._unsent + self._since)
        elif not self._held:
            return
        while self._bytes > self._limit:
            self._bytes -= len(self._held.popleft()[1])
        if not self._check_due:
            self._check_due = True
            self._loop.call_soon(self._check)

    def _check(self) -> None:
        self._check_due = False
        waiting = self._transport.get_write_buffer_size()
        sent = self._total - waiting
        held = self._held
        free: list[object] = []
        while held and held[0][0] <= sent:
            buffer = held.popleft()[1]
            self._bytes -= len(buffer)
            free.append(buffer)
        if free:
            self._give(free)
        if self._unsent_to is not None:
            changed = self._since or waiting != self._unsent
            self._unsent, self._since = waiting, 0
            if changed:
                self._unsent_to(waiting)
            if not free and not changed:  # a peer that does not read: look less often
                self._interval = min(2 * self._interval, CHECK_INTERVAL_MAX)
        if (held or self._unsent) and self._timer is None:  # nothing more may be written
            self._timer = self._loop.call_later(self._interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._check()

    def close(self) -> None:
        """The transport is gone: stop looking at it (what it held is reported as 0)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held.clear()
        self._bytes = 0
        if self._unsent_to is not None and (self._unsent or self._since):
            self._unsent = self._since = 0
            self._unsent_to(0)
