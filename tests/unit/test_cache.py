"""The write cache: the extent map, and every cache kind against a plain bytearray model.

The model of the overlay is simply the disk as a bytearray (base bytes, then each write and
zero applied in order). Every read must equal the model's slice, the base must only be asked
for bytes the overlay does not hold, and a write that does not fit must change nothing.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvs_target.cache import CacheFull, CacheKind, Extent, ExtentMap, WriteCache

D, Z = Extent.DATA, Extent.ZERO
KINDS: list[CacheKind] = ["ram", "file", "ram+overflow"]
PAGE = 512
SIZE = 6 * PAGE + 100  # not a whole number of pages: the last page is partial


# -- extent map ---------------------------------------------------------------------------


def test_extent_map_merges_splits_and_counts() -> None:
    extents = ExtentMap()
    extents.set(10, 20, D)
    extents.set(20, 30, D)  # touching, same kind: merged
    assert extents.extents() == [(10, 30, D)]
    extents.set(15, 25, Z)  # splits it
    assert extents.extents() == [(10, 15, D), (15, 25, Z), (25, 30, D)]
    assert extents.data_bytes == 10
    extents.set(5, 12, Z)
    assert extents.extents() == [(5, 12, Z), (12, 15, D), (15, 25, Z), (25, 30, D)]
    extents.set(0, 100, D)
    assert extents.extents() == [(0, 100, D)] and extents.data_bytes == 100
    extents.set(40, 40, Z)  # empty: nothing
    assert len(extents) == 1
    extents.set(100, 110, Z)
    extents.set(90, 100, Z)
    assert extents.extents() == [(0, 90, D), (90, 110, Z)]


def test_extent_map_segments_and_has_data() -> None:
    extents = ExtentMap()
    extents.set(10, 20, D)
    extents.set(30, 40, Z)
    assert list(extents.segments(0, 50)) == [
        (0, 10, None), (10, 20, D), (20, 30, None), (30, 40, Z), (40, 50, None)]
    assert list(extents.segments(15, 35)) == [(15, 20, D), (20, 30, None), (30, 35, Z)]
    assert list(extents.segments(12, 13)) == [(12, 13, D)]
    assert extents.has_data(19, 30) and not extents.has_data(20, 30)
    assert not extents.has_data(25, 45)


def _byte_model(operations: list[tuple[int, int, Extent]], size: int) -> list[Extent | None]:
    model: list[Extent | None] = [None] * size
    for start, end, kind in operations:
        model[start:end] = [kind] * (end - start)
    return model


ranges = st.tuples(st.integers(0, 200), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(ranges, st.sampled_from([D, Z])), max_size=30))
def test_extent_map_against_a_byte_model(steps: list[tuple[tuple[int, int], Extent]]) -> None:
    extents = ExtentMap()
    operations = [(start, end, kind) for (start, end), kind in steps]
    for start, end, kind in operations:
        extents.set(start, end, kind)
    model = _byte_model(operations, 300)
    listed = extents.extents()
    # sorted, non-overlapping, non-empty, touching neighbours of one kind merged
    for (s1, e1, k1), (s2, _, k2) in itertools.pairwise(listed):
        assert s1 < e1 <= s2 and not (e1 == s2 and k1 is k2)
    covered: list[Extent | None] = [None] * 300
    for start, end, kind in listed:
        covered[start:end] = [kind] * (end - start)
    assert covered == model
    assert extents.data_bytes == model.count(D)
    segments = list(extents.segments(0, 300))
    assert [kind for s, e, kind in segments for _ in range(e - s)] == model


# -- the cache against a bytearray model ----------------------------------------------------


class Base:
    """A read-only base that records what it was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[tuple[int, int]] = []

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        await asyncio.sleep(0)
        return self.data[offset : offset + length]


def make(kind: CacheKind, limit: int, tmp_path: object) -> WriteCache:
    ram_limit = min(limit, 2 * PAGE) if kind == "ram+overflow" else None
    return WriteCache(kind, SIZE, limit, directory=str(tmp_path), ram_limit=ram_limit,
                      page_size=PAGE)


@pytest.fixture
def base() -> Base:
    return Base(random.Random(1).randbytes(SIZE))


@pytest.fixture(params=KINDS)
def cache(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[WriteCache]:
    made = make(request.param, SIZE * 2, tmp_path)
    yield made
    made.close()


async def test_read_without_writes_goes_to_the_base_once(cache: WriteCache, base: Base) -> None:
    assert await cache.read(100, 1000, base.read) == base.data[100:1100]
    assert base.calls == [(100, 1000)]


async def test_read_merges_at_byte_precision(cache: WriteCache, base: Base) -> None:
    cache.write(10, b"abc")
    cache.zero(600, 7)
    cache.write(1023, b"\xff\xfe")  # across a page boundary
    data = await cache.read(0, 2000, base.read)
    expected = bytearray(base.data[:2000])
    expected[10:13] = b"abc"
    expected[600:607] = bytes(7)
    expected[1023:1025] = b"\xff\xfe"
    assert data == expected
    assert sorted(base.calls) == [(0, 10), (13, 587), (607, 416), (1025, 975)]
    base.calls.clear()
    assert await cache.read(11, 1, base.read) == b"b" and base.calls == []
    assert await cache.read(601, 3, base.read) == bytes(3) and base.calls == []


async def test_trim_reads_back_as_zeroes(cache: WriteCache, base: Base) -> None:
    cache.write(0, b"x" * 1500)
    cache.trim(100, 2000)
    assert await cache.read(0, 2200, base.read) == b"x" * 100 + bytes(2000) + base.data[2100:2200]
    assert cache.data_bytes == 100
    assert cache.used == PAGE  # only the first page still holds data


def test_full_cache_refuses_whole_writes_and_loses_nothing(tmp_path: object) -> None:
    for kind in KINDS:
        cache = make(kind, 3 * PAGE, tmp_path)
        cache.write(0, b"a" * (2 * PAGE))
        with pytest.raises(CacheFull) as caught:
            cache.write(3 * PAGE - 10, b"b" * 20)  # would need two more pages, one is left
        assert caught.value.errno == errno.ENOSPC and "full" in str(caught.value)
        assert cache.used == 2 * PAGE and cache.data_bytes == 2 * PAGE
        cache.write(PAGE, b"c" * PAGE)  # overwriting stored pages needs no space
        cache.write(5 * PAGE, b"d")  # the last free page
        assert cache.used == cache.limit
        cache.zero(0, PAGE)  # releases a page, never fails
        cache.write(4 * PAGE, b"e")
        base = Base(bytes(SIZE))
        data = asyncio.run(cache.read(0, SIZE, base.read))
        expected = bytearray(SIZE)
        expected[PAGE : 2 * PAGE] = b"c" * PAGE
        expected[5 * PAGE] = ord("d")
        expected[4 * PAGE] = ord("e")
        assert data == expected
        cache.close()


def test_range_checks(cache: WriteCache) -> None:
    with pytest.raises(ValueError):
        cache.write(SIZE - 1, b"ab")
    with pytest.raises(ValueError):
        cache.zero(-1, 1)
    cache.write(SIZE - 1, b"z")
    cache.zero(SIZE, 0)


def test_file_cache_releases_blocks(tmp_path: object) -> None:
    cache = WriteCache("file", 64 * 1024 * 1024, 64 * 1024 * 1024, directory=str(tmp_path))
    cache.write(0, b"x" * (8 * 1024 * 1024))
    assert cache.used == 8 * 1024 * 1024
    cache.trim(0, 8 * 1024 * 1024)
    assert cache.used == 0 and cache.data_bytes == 0
    cache.close()


def test_huge_trim_is_cheap(tmp_path: object) -> None:
    size = 1 << 40
    cache = WriteCache("ram", size, 1 << 20)
    cache.write(size // 2, b"abc")
    cache.trim(0, size)  # 2^28 pages: must not walk them
    assert cache.used == 0


def test_bad_arguments(tmp_path: object) -> None:
    with pytest.raises(ValueError):
        WriteCache("disk", SIZE, SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WriteCache("ram", SIZE, SIZE, page_size=1000)
    with pytest.raises(ValueError):
        WriteCache("ram+overflow", SIZE, SIZE, directory=str(tmp_path))


offsets = st.integers(0, SIZE)
steps = st.one_of(
    st.tuples(st.just("write"), offsets, st.binary(min_size=0, max_size=1300)),
    st.tuples(st.just("zero"), offsets, st.integers(0, 1300)),
    st.tuples(st.just("trim"), offsets, st.integers(0, 1300)),
    st.tuples(st.just("read"), offsets, st.integers(0, 1300)),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 8), st.lists(steps, max_size=25))
def test_cache_against_a_bytearray_model(
    kind: CacheKind, limit_pages: int, operations: list[tuple[str, int, bytes | int]],
) -> None:
    import tempfile

    base = Base(random.Random(limit_pages).randbytes(SIZE))
    model = bytearray(base.data)
    with tempfile.TemporaryDirectory() as directory:
        cache = make(kind, limit_pages * PAGE, directory)
        try:
            asyncio.run(_run(cache, base, model, operations))
        finally:
            cache.close()


async def _run(cache: WriteCache, base: Base, model: bytearray,
               operations: list[tuple[str, int, bytes | int]]) -> None:
    for name, offset, argument in operations:
        length = len(argument) if isinstance(argument, bytes) else argument
        length = min(length, SIZE - offset)
        if name == "write":
            assert isinstance(argument, bytes)
            data = argument[:length]
            before = (cache.used, cache.extents.extents())
            try:
                cache.write(offset, data)
            except CacheFull:
                assert (cache.used, cache.extents.extents()) == before
            else:
                model[offset : offset + length] = data
        elif name in ("zero", "trim"):
            getattr(cache, name)(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            base.calls.clear()
            assert await cache.read(offset, length, base.read) == model[offset : offset + length]
            for start, size in base.calls:  # the base is asked only for what we do not hold
                assert all(kind is None for _, _, kind in cache.extents.segments(start,
                                                                                 start + size))
        assert cache.used <= cache.limit
        stored = {page for start, end, kind in cache.extents.extents() if kind is Extent.DATA
                  for page in range(start // PAGE, (end - 1) // PAGE + 1)}
        assert cache.used == len(stored) * PAGE  # a page is held exactly while data touches it
    assert await cache.read(0, SIZE, base.read) == model
