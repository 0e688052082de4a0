"""Read buffers shared by every session of one server.

A fresh ``bytearray`` for each READ is allocated and zeroed only to be overwritten by the
read: for 1 MiB requests that was a third of pvsd's time (docs/benchmarks.md). Sessions take
buffers here and give them back once their transport has handed every byte to the kernel.
The pool belongs to the server, not to a session, so an idle session holds no buffer at all.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_LIMIT = 32 * 1024 * 1024


class BufferPool:
    """Spare buffers by size, at most ``limit`` bytes in all (the rest is left to the GC)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self.held = 0
        self._spare: dict[int, list[bytearray]] = {}

    def take(self, size: int) -> bytearray:
        """A buffer of ``size`` bytes; its contents are whatever it held before."""
        spare = self._spare.get(size)
        if spare:
            self.held -= size
            return spare.pop()
        return bytearray(size)

    def give(self, buffers: Iterable[bytearray]) -> None:
        """Buffers nobody reads or writes any more (the caller's promise)."""
        for buffer in buffers:
            size = len(buffer)
            if self.held + size > self.limit:
                return
            self._spare.setdefault(size, []).append(buffer)
            self.held += size
