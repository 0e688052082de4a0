"""The write cache of Standard Image mode: a byte-precise overlay over a read-only base.

A Standard Image vDisk is shared and never written; what the target writes goes here and is
lost when the target detaches. Reads merge the overlay over the base at byte precision and
fetch from the base only the gaps (one base read per gap, issued together).

Two structures:
- ``ExtentMap``: which byte ranges the overlay holds, as sorted, non-overlapping ``[start, end)``
  extents of kind DATA (bytes stored here) or ZERO (reads as zeroes, nothing stored), merged
  with touching neighbours of the same kind. Lookups are bisections.
- page stores: where DATA bytes live. The virtual disk is cut into pages (``page_size``); a page
  is stored while any DATA extent touches it and released as soon as none does. Byte ``x`` lives
  at ``x % page_size`` in page ``x // page_size``: in RAM (a bytearray per page) or in a local
  sparse file laid out like the disk (the page at the same offset; released pages become holes).

``used`` is what the stores hold (pages x page size), ``limit`` its bound. A write that needs
more pages than are left raises ``CacheFull`` (an OSError with ENOSPC, which the NBD layer
passes on as ENOSPC) before anything changes: nothing already written is ever lost and a write
that fits only in part is refused whole. Zeroing and trimming never need space.

TRIM is served as zeroing: the base below is read-only, so a trimmed range cannot "go back" to
anything but a defined value, and the overlay records zeroes. After ``trim`` (like after
``zero``), reads of that range return zeroes.

A full cache fails the machine's writes with ENOSPC, which qemu answers by pausing the guest
(``werror=stop``) with no word anywhere: so filling is logged, once as use passes 80 %, 90 %
and 100 % of the limit (100 %: also a write refused for lack of room), and again after use has
fallen ``REARM_POINTS`` below that level (trimming, zeroing) and passes it once more.
``fill_levels`` says which levels a use has passed; ``status()`` and the attributes ``used``,
``limit``, ``percent``, ``refused_writes`` are what status and metrics show.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import enum
import errno
import os
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, Protocol

import structlog

log = structlog.get_logger("pvs_target.cache")

Data = bytes | bytearray | memoryview
BaseRead = Callable[[int, int], Awaitable[Data]]
CacheKind = Literal["ram", "file", "ram+overflow"]


FILL_LEVELS = (80, 90, 100)
"""Percentages of the limit whose crossing is logged (100: full, or a write refused)."""
REARM_POINTS = 5
"""A level is logged again only after use has fallen this many points below it: a cache
hovering at a level does not log at every write and trim."""


def fill_levels(used: int, limit: int, *, refused: bool = False) -> frozenset[int]:
    """The levels of ``FILL_LEVELS`` that ``used`` bytes of ``limit`` have reached; a write
    refused for lack of room is 100 % whatever the pages say (the last free bytes may be too
    few for it)."""
    reached = {level for level in FILL_LEVELS if used * 100 >= level * limit}
    if refused:
        reached.add(100)
    return frozenset(reached)


def rearmed_levels(used: int, limit: int) -> frozenset[int]:
    """The levels ``used`` has fallen far enough below to be logged again when reached."""
    return frozenset(
        level for level in FILL_LEVELS if used * 100 < (level - REARM_POINTS) * limit
    )


class CacheFull(OSError):
    """The write does not fit in what is left of the cache; nothing was changed."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message


class Extent(enum.Enum):
    DATA = "data"
    ZERO = "zero"


class ExtentMap:
    """Sorted, non-overlapping ``[start, end)`` extents of DATA or ZERO, touching neighbours of
    one kind merged. Ranges not covered belong to the base."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._kinds: list[Extent] = []
        self.data_bytes = 0
        """Bytes covered by DATA extents."""

    def __len__(self) -> int:
        return len(self._starts)

    def extents(self) -> list[tuple[int, int, Extent]]:
        return list(zip(self._starts, self._ends, self._kinds, strict=True))

    def set(self, start: int, end: int, kind: Extent) -> None:
        """Make ``[start, end)`` one extent of ``kind``, replacing what covered it."""
        if start >= end:
            return
        starts, ends, kinds = self._starts, self._ends, self._kinds
        first = bisect_right(ends, start)  # the first extent ending after start
        last = bisect_left(starts, end)  # the first extent starting at or after end
        for k in range(first, last):
            if kinds[k] is Extent.DATA:
                self.data_bytes -= min(ends[k], end) - max(starts[k], start)
        if kind is Extent.DATA:
            self.data_bytes += end - start
        new: list[tuple[int, int, Extent]] = []
        low, high = start, end
        if first < last and starts[first] < start:  # the part of the first extent before us
            if kinds[first] is kind:
                low = starts[first]
            else:
                new.append((starts[first], start, kinds[first]))
        elif first > 0 and ends[first - 1] == start and kinds[first - 1] is kind:
            first -= 1  # a touching neighbour of the same kind: absorb it
            low = starts[first]
        tail: tuple[int, int, Extent] | None = None
        if first < last and ends[last - 1] > end:  # the part of the last extent after us
            if kinds[last - 1] is kind:
                high = ends[last - 1]
            else:
                tail = (end, ends[last - 1], kinds[last - 1])
        elif last < len(starts) and starts[last] == end and kinds[last] is kind:
            high = ends[last]
            last += 1
        new.append((low, high, kind))
        if tail is not None:
            new.append(tail)
        starts[first:last] = [piece[0] for piece in new]
        ends[first:last] = [piece[1] for piece in new]
        kinds[first:last] = [piece[2] for piece in new]

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, Extent | None]]:
        """``[start, end)`` cut into pieces, each DATA, ZERO or None (the base's)."""
        starts, ends, kinds = self._starts, self._ends, self._kinds
        index = bisect_right(ends, start)
        position = start
        count = len(starts)
        while position < end:
            if index < count and starts[index] <= position:
                piece_end = min(ends[index], end)
                yield position, piece_end, kinds[index]
                index += 1
            else:
                piece_end = min(starts[index], end) if index < count else end
                yield position, piece_end, None
            position = piece_end

    def touches(self, start: int, end: int) -> bool:
        """Whether any extent (DATA or ZERO) overlaps ``[start, end)``."""
        index = bisect_right(self._ends, start)
        return index < len(self._starts) and self._starts[index] < end

    def has_data(self, start: int, end: int) -> bool:
        """Whether any DATA extent overlaps ``[start, end)``."""
        index = bisect_right(self._ends, start)
        while index < len(self._starts) and self._starts[index] < end:
            if self._kinds[index] is Extent.DATA:
                return True
            index += 1
        return False


class _Store(Protocol):
    page_size: int

    def is_stored(self, page: int) -> bool: ...
    def stored_in(self, first: int, last: int) -> list[int]: ...
    def add(self, pages: list[int]) -> None: ...
    def release(self, pages: list[int]) -> None: ...
    def write(self, offset: int, data: memoryview) -> None: ...
    def read_into(self, offset: int, view: memoryview) -> None: ...
    def close(self) -> None: ...


class _RamStore:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.pages: dict[int, bytearray] = {}

    def is_stored(self, page: int) -> bool:
        return page in self.pages

    def stored_in(self, first: int, last: int) -> list[int]:
        return _stored_in(self.pages, first, last)

    def add(self, pages: list[int]) -> None:
        for page in pages:
            self.pages[page] = bytearray(self.page_size)

    def release(self, pages: list[int]) -> None:
        for page in pages:
            del self.pages[page]

    def write(self, offset: int, data: memoryview) -> None:
        for page, within, done, count in self._pieces(offset, len(data)):
            self.pages[page][within : within + count] = data[done : done + count]

    def read_into(self, offset: int, view: memoryview) -> None:
        for page, within, done, count in self._pieces(offset, len(view)):
            view[done : done + count] = self.pages[page][within : within + count]

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(page, offset in the page, offset in the buffer, length) of each page the range
        ``offset .. offset + length`` touches."""
        size = self.page_size
        done = 0
        while done < length:
            page, within = divmod(offset + done, size)
            count = min(size - within, length - done)
            yield page, within, done, count
            done += count

    def close(self) -> None:
        self.pages.clear()


class _FileStore:
    """Pages in an unlinked sparse file laid out like the disk (gone when closed or on a
    crash); released pages are punched out so the file's blocks stay within the limit."""

    def __init__(self, page_size: int, size: int, directory: str | None) -> None:
        self.page_size = page_size
        self.pages: set[int] = set()
        # Owned by the store and closed in close(); unlinked at once, so a crash leaves nothing.
        self._file = tempfile.TemporaryFile(prefix="pvs-write-cache-", dir=directory)  # noqa: SIM115
        self._fd = self._file.fileno()
        os.ftruncate(self._fd, size)

    def is_stored(self, page: int) -> bool:
        return page in self.pages

    def stored_in(self, first: int, last: int) -> list[int]:
        return _stored_in(self.pages, first, last)

    def add(self, pages: list[int]) -> None:
        self.pages.update(pages)

    def release(self, pages: list[int]) -> None:
        self.pages.difference_update(pages)
        for page in pages:
            _punch_hole(self._fd, page * self.page_size, self.page_size)

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def read_into(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count == 0:
                raise OSError(errno.EIO, f"write cache file ended at {offset + done}")
            done += count

    def close(self) -> None:
        self._file.close()


class _TieredStore:
    """RAM pages up to ``ram_pages``, then pages in the file."""

    def __init__(self, ram: _RamStore, file: _FileStore, ram_pages: int) -> None:
        self.page_size = ram.page_size
        self.ram = ram
        self.file = file
        self.ram_pages = ram_pages

    def is_stored(self, page: int) -> bool:
        return self.ram.is_stored(page) or self.file.is_stored(page)

    def stored_in(self, first: int, last: int) -> list[int]:
        return self.ram.stored_in(first, last) + self.file.stored_in(first, last)

    def add(self, pages: list[int]) -> None:
        room = max(0, self.ram_pages - len(self.ram.pages))
        self.ram.add(pages[:room])
        self.file.add(pages[room:])

    def release(self, pages: list[int]) -> None:
        self.ram.release([page for page in pages if page in self.ram.pages])
        self.file.release([page for page in pages if page in self.file.pages])

    def write(self, offset: int, data: memoryview) -> None:
        self._each_page(offset, data, write=True)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._each_page(offset, view, write=False)

    def _each_page(self, offset: int, view: memoryview, *, write: bool) -> None:
        size = self.page_size
        done = 0
        while done < len(view):
            page, within = divmod(offset + done, size)
            count = min(size - within, len(view) - done)
            store: _RamStore | _FileStore = self.ram if page in self.ram.pages else self.file
            part = view[done : done + count]
            if write:
                store.write(offset + done, part)
            else:
                store.read_into(offset + done, part)
            done += count

    def close(self) -> None:
        self.ram.close()
        self.file.close()


class WriteCache:
    """The overlay: ``write``/``zero``/``trim`` here, ``read`` merged over the base.

    kinds: ``"ram"`` (pages in memory, at most ``limit`` bytes), ``"file"`` (pages in a sparse
    file in ``directory``, at most ``limit`` bytes), ``"ram+overflow"`` (the first
    ``ram_limit`` bytes of pages in memory, the rest in the file, ``limit`` in all).
    """

    def __init__(
        self,
        kind: CacheKind,
        size: int,
        limit: int,
        *,
        directory: str | None = None,
        ram_limit: int | None = None,
        page_size: int = 4096,
    ) -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError("page size must be a power of 2, at least 512")
        if size < 0 or limit < 0:
            raise ValueError("size and limit must not be negative")
        self.kind = kind
        self.size = size
        self.limit = limit
        self.page_size = page_size
        self.extents = ExtentMap()
        self._pages = 0
        self.refused_writes = 0
        """Writes refused for lack of room (the machine got ENOSPC)."""
        self.warned: set[int] = set()
        """The fill levels logged and not since fallen back below (see ``fill_levels``)."""
        self._disk_full_said = False
        self._store: _Store
        if kind == "ram":
            self._store = _RamStore(page_size)
        elif kind == "file":
            self._store = _FileStore(page_size, size, directory)
        elif kind == "ram+overflow":
            if ram_limit is None or not 0 <= ram_limit <= limit:
                raise ValueError("ram+overflow needs 0 <= ram_limit <= limit")
            file = _FileStore(page_size, size, directory)
            self._store = _TieredStore(_RamStore(page_size), file, ram_limit // page_size)
        else:
            raise ValueError(f"unknown write cache kind {kind!r}: ram, file or ram+overflow")

    @property
    def used(self) -> int:
        """Bytes of storage held (whole pages)."""
        return self._pages * self.page_size

    @property
    def data_bytes(self) -> int:
        """Bytes written and not since zeroed (at most ``used``)."""
        return self.extents.data_bytes

    @property
    def percent(self) -> float:
        """``used`` as a percentage of ``limit`` (100 for a zero limit)."""
        return 100.0 * self.used / self.limit if self.limit else 100.0

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "used": self.used, "limit": self.limit,
            "percent": round(self.percent, 1), "data_bytes": self.data_bytes,
            "refused_writes": self.refused_writes,
        }

    def _watch_fill(self, *, refused: bool = False) -> None:
        """Log each fill level as it is reached (once until use falls well below it)."""
        reached = fill_levels(self.used, self.limit, refused=refused) - self.warned
        if not reached:
            return
        self.warned |= reached
        level = max(reached)
        fields = {
            "threshold": level, "used": self.used, "limit": self.limit,
            "percent": round(self.percent, 1), "kind": self.kind,
        }
        if level >= 100:
            log.error(
                "write_cache_full", refused_writes=self.refused_writes, **fields,
                action="the machine's writes fail with ENOSPC (qemu pauses a guest with "
                "werror=stop): free space in the guest and TRIM it (discard=unmap), or "
                "give a larger --cache-size; only a restart of pvs-target empties the cache "
                "(a reboot of the virtual machine keeps it)",
            )
        else:
            log.warning(
                "write_cache_filling", **fields,
                action="when the write cache is full the machine's writes fail with ENOSPC: "
                "give a larger --cache-size (or --cache file on a larger disk), or have the "
                "guest TRIM freed space (discard=unmap)",
            )

    def close(self) -> None:
        self._store.close()

    def write(self, offset: int, data: Data) -> None:
        """Store ``data`` at ``offset``; raise CacheFull, changing nothing, if it cannot fit."""
        length = len(data)
        self._check_range(offset, length)
        if not length:
            return
        size = self.page_size
        missing = [
            page
            for page in range(offset // size, (offset + length - 1) // size + 1)
            if not self._store.is_stored(page)
        ]
        if (self._pages + len(missing)) * size > self.limit:
            self.refused_writes += 1
            self._watch_fill(refused=True)
            raise CacheFull(
                f"write cache full: {length} bytes at {offset} need {len(missing) * size} "
                f"more bytes, {self.limit - self.used} of {self.limit} are left"
            )
        self._store.add(missing)
        self._pages += len(missing)
        try:
            with memoryview(data) as view:
                self._store.write(offset, view.cast("B"))
        except OSError as error:  # the cache file's disk is full (or failing)
            self._store.release(missing)
            self._pages -= len(missing)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                self.refused_writes += 1
            if error.errno in (errno.ENOSPC, errno.EDQUOT) and not self._disk_full_said:
                self._disk_full_said = True  # again once space was freed
                log.error(
                    "write_cache_disk_full", used=self.used, limit=self.limit,
                    error=str(error), action="the disk of the cache file is full before the "
                    "cache reached its limit: free space there, or give --cache-dir on a "
                    "larger disk (or a smaller --cache-size)",
                )
            raise
        self.extents.set(offset, offset + length, Extent.DATA)
        if missing:
            self._watch_fill()

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeroes; releases pages, never fails for
        lack of space."""
        self._check_range(offset, length)
        if not length:
            return
        end = offset + length
        self.extents.set(offset, end, Extent.ZERO)
        size = self.page_size
        first, last = offset // size, (end - 1) // size
        released = []
        for page in self._store.stored_in(first, last):
            inside = offset <= page * size and (page + 1) * size <= end
            if inside or not self.extents.has_data(page * size, (page + 1) * size):
                released.append(page)
        self._store.release(released)
        self._pages -= len(released)
        if released:
            self._disk_full_said = False
            self.warned -= rearmed_levels(self.used, self.limit)

    def trim(self, offset: int, length: int) -> None:
        """Served as ``zero``: after a trim the range reads as zeroes (see the module doc)."""
        self.zero(offset, length)

    def untouched(self, offset: int, length: int) -> bool:
        """Whether the machine never wrote, zeroed or trimmed any byte of the range: then a
        read of it is the base's alone."""
        return not self.extents.touches(offset, offset + length)

    async def read(self, offset: int, length: int, base_read: BaseRead) -> Data:
        """``length`` bytes at ``offset``: the overlay where it has them, the base elsewhere.
        The base is asked only for the gaps, one read per gap, all at once."""
        self._check_range(offset, length)
        segments = list(self.extents.segments(offset, offset + length))
        if len(segments) == 1 and segments[0][2] is None:
            return await base_read(offset, length)
        result = bytearray(length)
        view = memoryview(result)
        gaps: list[tuple[int, int]] = []
        for start, end, kind in segments:
            if kind is Extent.DATA:
                self._store.read_into(start, view[start - offset : end - offset])
            elif kind is None:
                gaps.append((start, end))
        if gaps:
            pieces = await asyncio.gather(*(base_read(start, end - start) for start, end in gaps))
            for (start, end), piece in zip(gaps, pieces, strict=True):
                if len(piece) != end - start:
                    raise OSError(errno.EIO, f"base returned {len(piece)} of {end - start} bytes")
                view[start - offset : end - offset] = piece
        return result

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{offset}+{length} is outside the disk (0..{self.size})")


def _stored_in(pages: dict[int, bytearray] | set[int], first: int, last: int) -> list[int]:
    """Stored pages in ``first..last``, by whichever walk is shorter (a trim may span TiBs)."""
    if last - first + 1 <= len(pages):
        return [page for page in range(first, last + 1) if page in pages]
    return [page for page in pages if first <= page <= last]


_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_fallocate: Callable[..., int] | None = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
except (OSError, AttributeError, TypeError):  # not Linux/glibc: released pages keep blocks
    _fallocate = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _fallocate is not None:
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


__all__ = ["BaseRead", "CacheFull", "CacheKind", "Extent", "ExtentMap", "WriteCache"]
