"""The target's block verification (pvs_target/verify.py) against a server scripted in memory.

The server holds a real image and its real manifest and answers READ and DIGESTS from them,
or, when told to, lies: a wrong block, a wrong page, an identity whose root leads nowhere.
Every boundary of the tree is read: first and last block, a short last block, a read across
blocks, unaligned reads, a tree of three levels.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
import structlog

from pvs_protocol import events as ev
from pvs_protocol.buffers import PoolBuffer
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.manifest import FANOUT, Manifest, hash_blocks
from pvs_target.connection import BUFFERS
from pvs_target.verify import BlockMismatch, DigestsUnknown, PageMismatch, ReadVerifier

BLOCK = 16384
TIMEOUT = 5.0


def manifest_of(image: bytes, block_size: int = BLOCK) -> Manifest:
    leaves = b"".join(hash_blocks(image, block_size))
    return Manifest.build(3, 1_700_000_000_123_456_789, len(image), block_size, leaves)


class MemoryServer:
    """A server's answers from an image and its manifest, with scripted lies."""

    def __init__(
        self,
        image: bytes,
        manifest: Manifest,
        *,
        name: str = "pvs1",
        max_request: int = 1 << 20,
        bad_block: int | None = None,
        bad_page: tuple[int, int] | None = None,
    ) -> None:
        self.image = image
        self.manifest = manifest
        self.server = f"127.0.0.1:{6910 + len(name)}"
        self.hello_reply = ev.HelloReply(2, max_request, 16, ev.Checksum.NONE, name)
        self.max_request = max_request
        self.bad_block = bad_block
        self.bad_page = bad_page
        self.reads: list[tuple[int, int]] = []
        self.pages: list[tuple[int, int]] = []
        self.damaged: list[tuple[int, str]] = []

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        assert 0 < length <= self.max_request and offset + length <= len(self.image)
        self.reads.append((offset, length))
        await asyncio.sleep(0)  # answers arrive later, as from a socket
        data = BUFFERS.take(length)
        data[:] = self.image[offset : offset + length]
        if self.bad_block is not None:
            at = self.bad_block * self.manifest.block_size - offset
            if 0 <= at < length:
                data[at] ^= 0x01
        return data

    async def digests(self, level: int, page: int, length: int) -> bytes | bytearray:
        self.pages.append((level, page))
        await asyncio.sleep(0)
        data = bytearray(self.manifest.page(level, page))
        assert len(data) == length
        if (level, page) == self.bad_page:
            data[0] ^= 0x80
        return data

    def report_damaged(self, block: int, message: str) -> None:
        self.damaged.append((block, message))


def image_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def read(verifier: ReadVerifier, server: MemoryServer, offset: int, length: int) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return bytes(await verifier.read(server, offset, length))


# -- every boundary --------------------------------------------------------------------------

SHORT_LAST = 10 * BLOCK + 1234
"""Ten whole blocks and a short eleventh."""


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, BLOCK),  # the first block
        (0, 1),  # its first byte
        (9 * BLOCK, BLOCK),  # the last whole block
        (10 * BLOCK, 1234),  # the short last block, whole
        (SHORT_LAST - 1, 1),  # the image's last byte
        (BLOCK - 1, 2),  # across two blocks, one byte each
        (BLOCK + 100, 3 * BLOCK),  # unaligned at both ends, across four blocks
        (5, SHORT_LAST - 5),  # everything but the first bytes
        (0, SHORT_LAST),  # the whole image
    ],
)
async def test_reads_hand_out_exactly_the_checked_bytes(offset: int, length: int) -> None:
    image = image_of(SHORT_LAST)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(manifest.identity)
    assert await read(verifier, server, offset, length) == image[offset : offset + length]
    start, span = verifier.span(offset, length)
    assert server.reads == [(start, span)]  # widened to whole blocks, cut at the image end
    assert start % BLOCK == 0 and (start + span == SHORT_LAST or span % BLOCK == 0)
    assert verifier.blocks_checked == len(range(start, start + span, BLOCK))
    assert server.pages == [(0, 0)]  # one level: the top page, proved against the root
    assert server.damaged == [] and verifier.mismatches == []


async def test_an_image_of_one_short_block() -> None:
    image = image_of(100)
    manifest = manifest_of(image)
    verifier = ReadVerifier(manifest.identity)
    assert await read(verifier, MemoryServer(image, manifest), 10, 50) == image[10:60]


async def test_a_tree_of_three_levels_fetches_one_page_per_level_top_down() -> None:
    block = 4096
    image = image_of(block * FANOUT * FANOUT + 5000)  # 16386 blocks: 129 leaf pages, 2, 1
    manifest = manifest_of(image, block)
    assert manifest.shape.counts == (16386, 129, 2)
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(manifest.identity)
    last = len(image) - 3
    assert await read(verifier, server, last, 3) == image[last:]
    assert server.pages == [(2, 0), (1, 1), (0, 128)]
    # a block under another level-1 digest needs only its leaf page now
    assert await read(verifier, server, 0, block) == image[:block]
    assert server.pages[3:] == [(1, 0), (0, 0)]
    assert await read(verifier, server, block * FANOUT * 5, 10) == image[block * FANOUT * 5 :][:10]
    assert server.pages[5:] == [(0, 5)]
    assert verifier.pages_fetched == 6


async def test_a_page_wanted_by_concurrent_reads_is_fetched_once() -> None:
    image = image_of(40 * BLOCK)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(manifest.identity)
    offsets = [block * BLOCK + 7 for block in range(0, 39, 3)]
    async with asyncio.timeout(TIMEOUT):
        results = await asyncio.gather(*(verifier.read(server, at, 100) for at in offsets))
    assert [bytes(data) for data in results] == [image[at : at + 100] for at in offsets]
    assert server.pages == [(0, 0)]


async def test_a_request_limit_below_the_block_size_reads_a_block_in_pieces() -> None:
    image = image_of(3 * BLOCK)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest, max_request=4096)
    verifier = ReadVerifier(manifest.identity)
    assert await read(verifier, server, BLOCK + 10, 20) == image[BLOCK + 10 : BLOCK + 30]
    assert server.reads == [(BLOCK + at, 4096) for at in range(0, BLOCK, 4096)]


async def test_a_read_past_the_end_is_refused_before_anything_is_sent() -> None:
    image = image_of(2 * BLOCK)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest)
    with pytest.raises(ValueError, match="outside the image"):
        await read(ReadVerifier(manifest.identity), server, BLOCK, BLOCK + 1)
    assert server.reads == server.pages == []


# -- lies ------------------------------------------------------------------------------------


async def test_a_wrong_block_is_never_handed_out_and_is_reported() -> None:
    image = image_of(SHORT_LAST)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest, bad_block=4)
    verifier = ReadVerifier(manifest.identity)
    assert await read(verifier, server, 0, 4 * BLOCK) == image[: 4 * BLOCK]  # blocks 0..3
    with pytest.raises(BlockMismatch) as raised:
        await read(verifier, server, 4 * BLOCK + 100, 10)  # 10 bytes of block 4
    assert (raised.value.block, raised.value.offset) == (4, 4 * BLOCK)
    assert raised.value.server == "pvs1" and raised.value.address == server.server
    assert [block for block, _ in server.damaged] == [4]
    assert "block 4 does not match" in server.damaged[0][1]
    assert verifier.blocks_checked == 4
    # the short last block, and a read across a bad block: the same
    server.bad_block = 10
    with pytest.raises(BlockMismatch) as raised:
        await read(verifier, server, 9 * BLOCK, BLOCK + 1)
    assert raised.value.block == 10


async def test_a_wrong_root_fails_at_the_top_page() -> None:
    image = image_of(3 * BLOCK)
    manifest = manifest_of(image)
    identity = manifest.identity
    forged = ReplicaIdentity(
        identity.version, identity.timestamp_ns, identity.size, bytes(32), identity.block_size
    )
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(forged)
    with pytest.raises(PageMismatch, match="pinned root") as raised:
        await read(verifier, server, 0, 10)
    assert raised.value.block == 0
    assert [block for block, _ in server.damaged] == [0]
    assert verifier.blocks_checked == 0


async def test_a_wrong_leaf_page_fails_its_parent_and_names_its_first_block() -> None:
    block = 4096
    image = image_of(block * FANOUT * 3)
    manifest = manifest_of(image, block)
    server = MemoryServer(image, manifest, bad_page=(0, 2))
    verifier = ReadVerifier(manifest.identity)
    assert await read(verifier, server, 0, 100) == image[:100]  # page 0 is fine
    with pytest.raises(PageMismatch, match="does not match its parent") as raised:
        await read(verifier, server, block * FANOUT * 2 + 5, 10)
    assert raised.value.block == FANOUT * 2
    assert [damaged for damaged, _ in server.damaged] == [FANOUT * 2]
    # the lie was not learnt: a good server's page is accepted afterwards
    good = MemoryServer(image, manifest, name="pvs2")
    at = block * FANOUT * 2 + 5
    assert await read(verifier, good, at, 10) == image[at : at + 10]


async def test_a_digest_dropped_from_the_cache_is_fetched_again_not_blamed() -> None:
    block = 4096
    image = image_of(block * FANOUT * 2)
    manifest = manifest_of(image, block)
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(manifest.identity, cached_pages=1)
    await verifier.ensure(server, 0, block)
    data = await server.read(0, block)
    await verifier.ensure(server, block * FANOUT, block)  # evicts leaf page 0
    with pytest.raises(DigestsUnknown):
        verifier.check(server, 0, data)
    assert server.damaged == []
    assert await read(verifier, server, 0, block) == image[:block]


# -- buffers ---------------------------------------------------------------------------------


async def test_an_aligned_read_hands_out_the_reply_buffer_itself() -> None:
    image = image_of(8 * BLOCK)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(manifest.identity)
    data = await verifier.read(server, 0, 4 * BLOCK)
    assert type(data) is PoolBuffer and len(data) == 4 * BLOCK  # no copy; the export gives it back


async def test_a_widened_read_hands_out_a_copy_and_gives_the_wide_buffer_back() -> None:
    image = image_of(8 * BLOCK)
    manifest = manifest_of(image)
    server = MemoryServer(image, manifest)
    verifier = ReadVerifier(manifest.identity)
    held = BUFFERS.held
    data = await verifier.read(server, 100, 4 * BLOCK)
    assert len(data) == 4 * BLOCK and bytes(data) == image[100 : 100 + 4 * BLOCK]
    assert BUFFERS.held == held + 5 * BLOCK  # the 5-block reply went back to the pool
    again = BUFFERS.take(5 * BLOCK)  # ... and is not the buffer handed out
    assert again is not data


def test_a_mismatch_is_logged_once_per_server(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(image_of(BLOCK))
    verifier = ReadVerifier(manifest.identity, log=structlog.get_logger("test"))
    make: Callable[[str, int], BlockMismatch] = lambda name, block: BlockMismatch(  # noqa: E731
        name, "127.0.0.1:1", block, block * BLOCK, "scripted"
    )
    assert verifier.record(make("pvs1", 0))
    assert not verifier.record(make("pvs1", 0))
    assert verifier.record(make("pvs2", 0))
    assert capsys.readouterr().out.count("block_mismatch") == 2
    status = verifier.status()
    assert [m["server"] for m in status["mismatches"]] == ["pvs1", "pvs1", "pvs2"]
    assert status["dropped_servers"] == [
        {"name": "pvs1", "address": "127.0.0.1:1"}, {"name": "pvs2", "address": "127.0.0.1:1"},
    ]
