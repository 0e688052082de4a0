"""The manifest hash tree at every boundary: sizes around blocks and pages, proofs, damage."""

from __future__ import annotations

import random

import pytest

from pvs_protocol import manifest as mf
from pvs_protocol.identity import ReplicaIdentity

BLOCK = mf.MIN_BLOCK_SIZE
PAGE_SPAN = mf.FANOUT * BLOCK
"""Bytes covered by one page of level-0 digests."""


def image(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def manifest_of(data: bytes, *, version: int = 1, created_ns: int = 10**18) -> mf.Manifest:
    leaves = b"".join(mf.hash_blocks(data, BLOCK))
    return mf.Manifest.build(version, created_ns, len(data), BLOCK, leaves)


def learn(verifier: mf.Verifier, manifest: mf.Manifest, blocks: range) -> int:
    """Fetch pages as the target does, in rounds; return how many were fetched."""
    fetched = 0
    while pages := verifier.missing(blocks):
        for level, page in pages:
            verifier.add_page(level, page, manifest.page(level, page))
            fetched += 1
    return fetched


SIZES = [
    0, 1, BLOCK - 1, BLOCK, BLOCK + 1, PAGE_SPAN - 1, PAGE_SPAN, PAGE_SPAN + 1,
    PAGE_SPAN * mf.FANOUT + 3 * BLOCK + 17,
]


@pytest.mark.parametrize("size", SIZES)
def test_every_block_checks_and_the_file_round_trips(size: int) -> None:
    data = image(size)
    manifest = manifest_of(data)
    assert mf.Manifest.decode(manifest.encode()) == manifest
    verifier = mf.Verifier(manifest.identity)
    shape = manifest.shape
    learn(verifier, manifest, range(shape.blocks))
    assert verifier.bad_blocks(0, data) == []
    assert len(manifest.encode()) == mf.HEADER_SIZE + sum(shape.counts) * 32


@pytest.mark.parametrize("size", [PAGE_SPAN * mf.FANOUT + 3 * BLOCK + 17])
def test_first_last_and_short_last_block(size: int) -> None:
    data = image(size)
    manifest = manifest_of(data)
    shape = manifest.shape
    assert shape.top_level == 2
    for block in (0, shape.blocks - 1):
        verifier = mf.Verifier(manifest.identity)
        assert learn(verifier, manifest, range(block, block + 1)) == 3  # one page per level
        start, length = shape.block_range(block)
        assert verifier.bad_blocks(start, data[start : start + length]) == []
        damaged = bytearray(data[start : start + length])
        damaged[-1] ^= 1
        assert verifier.bad_blocks(start, damaged) == [block]
    assert shape.block_range(shape.blocks - 1)[1] == 17


def test_a_read_across_blocks_is_widened_to_whole_blocks() -> None:
    data = image(3 * BLOCK + 100)
    manifest = manifest_of(data)
    shape = manifest.shape
    assert mf.aligned(shape, BLOCK - 1, 2) == (0, 2 * BLOCK)
    assert mf.aligned(shape, 3 * BLOCK + 5, 10) == (3 * BLOCK, 100)  # cut at the end
    start, length = mf.aligned(shape, 10, 2 * BLOCK)
    verifier = mf.Verifier(manifest.identity)
    learn(verifier, manifest, shape.blocks_of(start, length))
    piece = bytearray(data[start : start + length])
    assert verifier.bad_blocks(start, piece) == []
    piece[BLOCK + 3] ^= 0x80
    assert verifier.bad_blocks(start, piece) == [1]
    with pytest.raises(mf.ManifestError):
        verifier.bad_blocks(10, piece)


def test_a_wrong_root_refuses_the_top_page() -> None:
    data = image(PAGE_SPAN + 1)
    manifest = manifest_of(data)
    forged = ReplicaIdentity(1, 10**18, len(data), bytes(32), BLOCK)
    verifier = mf.Verifier(forged)
    level, page = verifier.missing([0])[0]
    with pytest.raises(mf.ManifestError, match="pinned root"):
        verifier.add_page(level, page, manifest.page(level, page))


def test_the_same_content_made_twice_is_two_versions() -> None:
    data = image(5 * BLOCK)
    first, second = manifest_of(data, created_ns=1), manifest_of(data, created_ns=2)
    assert first.levels == second.levels and first.root != second.root
    assert first.identity.differences(second.identity) == ["timestamp", "content"]
    assert not first.identity.is_identical(second.identity)


def test_a_wrong_page_at_any_level_is_refused() -> None:
    data = image(PAGE_SPAN * 2 + BLOCK)
    manifest = manifest_of(data)
    verifier = mf.Verifier(manifest.identity)
    top = manifest.shape.top_level
    verifier.add_page(top, 0, manifest.page(top, 0))
    wrong = bytearray(manifest.page(0, 1))
    wrong[40] ^= 1
    with pytest.raises(mf.ManifestError, match="parent"):
        verifier.add_page(0, 1, wrong)
    with pytest.raises(mf.ManifestError, match="length"):
        verifier.add_page(0, 1, manifest.page(0, 1)[:-32])
    with pytest.raises(mf.ManifestError):
        verifier.add_page(0, 9, manifest.page(0, 1))
    verifier.add_page(0, 1, manifest.page(0, 1))
    assert verifier.digest_of(mf.FANOUT) == manifest.leaf(mf.FANOUT)


def test_a_page_before_its_parent_is_refused() -> None:
    data = image(PAGE_SPAN * mf.FANOUT + BLOCK)
    manifest = manifest_of(data)
    verifier = mf.Verifier(manifest.identity)
    with pytest.raises(mf.ManifestError, match="before its parent"):
        verifier.add_page(0, 0, manifest.page(0, 0))


def test_incremental_update_equals_a_rebuild() -> None:
    data = bytearray(image(PAGE_SPAN * 3 + 5))
    manifest = manifest_of(bytes(data))
    for block in (0, 200, manifest.shape.blocks - 1):
        start, length = manifest.shape.block_range(block)
        data[start : start + length] = image(length, seed=block + 9)
    changed = {
        block: mf.leaf_digest(data[slice(*_span(manifest.shape.block_range(block)))])
        for block in (0, 200, manifest.shape.blocks - 1)
    }
    updated = manifest.with_leaves(changed)
    assert updated == manifest_of(bytes(data))


def _span(block_range: tuple[int, int]) -> tuple[int, int]:
    start, length = block_range
    return start, start + length


def test_a_damaged_manifest_file_is_refused() -> None:
    encoded = bytearray(manifest_of(image(PAGE_SPAN + 5)).encode())
    for position in (0, 20, mf.HEADER_SIZE + 3, len(encoded) - 1):
        damaged = bytearray(encoded)
        damaged[position] ^= 1
        with pytest.raises(mf.ManifestError):
            mf.Manifest.decode(damaged)
    with pytest.raises(mf.ManifestError):
        mf.Manifest.decode(encoded[:-1])
    with pytest.raises(mf.ManifestError):
        mf.Manifest.decode(encoded + b"\0")


@pytest.mark.parametrize("block_size", [0, 512, 4095, 3 * 4096, 2 << 20])
def test_block_sizes_outside_the_rule_are_refused(block_size: int) -> None:
    with pytest.raises(mf.ManifestError):
        mf.Shape.of(4096, block_size)


def test_restamped_is_a_new_identity_with_the_same_digests() -> None:
    manifest = manifest_of(image(BLOCK * 3))
    again = manifest.restamped(2, 5)
    assert again.levels == manifest.levels
    assert again.identity.differences(manifest.identity) == ["version", "timestamp", "content"]
