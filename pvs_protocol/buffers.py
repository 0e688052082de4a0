"""Block buffers reused instead of allocated per request, on both sides of a connection.

A fresh 1 MiB ``bytearray`` is zeroed, and its pages faulted in, only to be overwritten by a
read or a receive: on the server that was a third of its time for 1 MiB requests, on the
target more than half (docs/benchmarks.md). A buffer taken here goes back once nothing reads
or writes it any more, which for a reply means once the transport has handed every byte of it
to the kernel. A pool belongs to a process, not to a session, so an idle session holds none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

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
        spare = self._spare.get(size)
        if spare:
            self.held -= size
            return spare.pop()
        return PoolBuffer(size)

    def give(self, buffers: Iterable[object]) -> None:
        """Buffers nobody reads or writes any more (the caller's promise); anything that is
        not a ``PoolBuffer`` is ignored."""
        for buffer in buffers:
            if type(buffer) is not PoolBuffer:
                continue
            size = len(buffer)
            if self.held + size <= self.limit:
                self._spare.setdefault(size, []).append(buffer)
                self.held += size


class _Transport(Protocol):
    def get_write_buffer_size(self) -> int: ...


class Lent:
    """Pool buffers written to one transport, given back (``give``, a pool's or a backend's)
    once the transport holds none of its data.

    uvloop queues a write until the end of the loop turn and keeps a reference (not a copy)
    to what it could not send, so a buffer is free only when the transport's write buffer is
    empty: that is looked at on the next loop turn after a write, and on every later write.
    At most ``limit`` bytes of them are remembered; older ones are left to the GC, so a peer
    that stops reading costs no more memory than without the pool.
    """

    def __init__(
        self, give: Callable[[list[object]], None], transport: _Transport,
        loop: asyncio.AbstractEventLoop, limit: int = 8 * 1024 * 1024,
    ) -> None:
        self._give = give
        self._transport = transport
        self._loop = loop
        self._limit = limit
        self._held: list[PoolBuffer] = []
        self._bytes = 0
        self._check_due = False

    def written(self, buffer: object) -> None:
        """``buffer`` (a ``PoolBuffer`` or anything else, then ignored) was just written."""
        if type(buffer) is not PoolBuffer:
            return
        self._held.append(buffer)
        self._bytes += len(buffer)
        while self._bytes > self._limit:  # a peer that does not read: let the GC have them
            self._bytes -= len(self._held.pop(0))
        if not self._check_due:
            self._check_due = True
            self._loop.call_soon(self._check)

    def _check(self) -> None:
        self._check_due = False
        if not self._transport.get_write_buffer_size():  # closing ones may still flush
            held, self._held, self._bytes = self._held, [], 0
            self._give(list(held))
