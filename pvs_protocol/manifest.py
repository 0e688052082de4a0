"""vDisk manifests: a hash tree over an image's blocks, whose root is the version's identity.

A manifest is made once, when a version is made (``pvsctl vdisk create`` or ``import``), and
travels with the image. It names the version, the time it was made, the image size, the block
size, and a BLAKE3 digest of every block, gathered into a tree of pages of ``FANOUT`` digests:

    level 0            D0[0] D0[1] ... D0[n-1]           one digest per block
    level k + 1        D(k+1)[j] = node(page j of level k)   a page is FANOUT digests
    top                node(the one page of the highest level)
    root               H_root(header fields || top)

Any block can therefore be checked with one page per level, each checked against its parent
and the highest against the root, so a target that pinned a root at login needs nothing else
from the server it trusts. The hashes are keyed BLAKE3, with one key per role (leaf, node,
root) so that no page can pass for a block or a block for a page. BLAKE3 was chosen by
measurement (docs/benchmarks.md): 5.7 GB/s over 16 KiB blocks on the development machine,
against 2.0 GB/s for SHA-256 with the CPU's SHA extensions.

This module is pure: bytes in, bytes and verdicts out. Files are pvsd's business
(``pvsd/manifest.py``); fetching pages is the target's (``pvs_target/verify.py``).
"""

from __future__ import annotations

import dataclasses
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from blake3 import blake3

from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity

FORMAT = 1
ALGORITHM_BLAKE3 = 1
FANOUT = 128
"""Digests per page: a page is 4 KiB, one small request, and a tree of 16 KiB blocks is three
levels deep up to 32 GiB, four up to 4 TiB."""
PAGE_SIZE = FANOUT * DIGEST_SIZE
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 16384
"""BLAKE3 runs at 2.0 GB/s over 4 KiB blocks and 5.7 GB/s over 16 KiB ones here (its speed
comes from hashing 1 KiB chunks of one input in parallel), and a 4 KiB read costs a 16 KiB
transfer at most: a quarter of the per-GiB hashing cost for a small penalty on small reads."""
MAGIC = b"PVSMANIF"
_HEADER = struct.Struct(">8sHBBIQQII32s")
"""magic, format, algorithm, reserved, version, created_ns, size, block_size, fanout, root."""
HEADER_SIZE = _HEADER.size  # 72
_ROOT_FIELDS = struct.Struct(">HBIQQII")

_LEAF_KEY = blake3(b"pvs manifest leaf key v1").digest()
_NODE_KEY = blake3(b"pvs manifest node key v1").digest()
_ROOT_KEY = blake3(b"pvs manifest root key v1").digest()


class ManifestError(ValueError):
    """A manifest, or a page of one, is malformed or does not match what it should."""


def leaf_digest(block: bytes | bytearray | memoryview) -> bytes:
    """The digest of one block (the last one of an image may be short)."""
    return blake3(block, key=_LEAF_KEY).digest()


def node_digest(page: bytes | bytearray | memoryview) -> bytes:
    return blake3(page, key=_NODE_KEY).digest()


def check_block_size(block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ManifestError(
            f"block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to "
            f"{MAX_BLOCK_SIZE}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """How many digests each level of the tree of an image holds; the same on both sides."""

    size: int
    block_size: int
    counts: tuple[int, ...]
    """Digests per level, level 0 (blocks) first; the last level fits in one page."""

    @classmethod
    def of(cls, size: int, block_size: int) -> Shape:
        check_block_size(block_size)
        if size < 0:
            raise ManifestError("negative image size")
        counts = [-(-size // block_size)]
        while counts[-1] > FANOUT:
            counts.append(-(-counts[-1] // FANOUT))
        return cls(size, block_size, tuple(counts))

    @property
    def blocks(self) -> int:
        return self.counts[0]

    @property
    def top_level(self) -> int:
        return len(self.counts) - 1

    def pages(self, level: int) -> int:
        return -(-self.counts[level] // FANOUT)

    def page_length(self, level: int, page: int) -> int:
        """Bytes in page ``page`` of ``level``; ManifestError if there is no such page."""
        if not 0 <= level < len(self.counts):
            raise ManifestError(f"no level {level} (the tree has {len(self.counts)})")
        count = self.counts[level]
        if level == self.top_level and count == 0 and page == 0:
            return 0  # an empty image: the top page holds no digest
        if not 0 <= page < self.pages(level):
            raise ManifestError(f"no page {page} in level {level}")
        return min(FANOUT, count - page * FANOUT) * DIGEST_SIZE

    def block_range(self, index: int) -> tuple[int, int]:
        """Offset and length of block ``index``."""
        start = index * self.block_size
        return start, min(self.block_size, self.size - start)

    def blocks_of(self, offset: int, length: int) -> range:
        """The blocks that bytes ``offset`` .. ``offset + length`` touch."""
        if length <= 0:
            return range(0)
        return range(offset // self.block_size, (offset + length - 1) // self.block_size + 1)


def root_digest(
    version: int, created_ns: int, size: int, block_size: int, top: bytes
) -> bytes:
    """The root: the header fields and the top of the tree, so that a root names one version
    made at one time, and not merely some content."""
    fields = _ROOT_FIELDS.pack(
        FORMAT, ALGORITHM_BLAKE3, version, created_ns, size, block_size, FANOUT
    )
    return blake3(fields + top, key=_ROOT_KEY).digest()


def build_levels(leaves: bytes, shape: Shape) -> list[bytes]:
    """Every level of the tree from the concatenated leaf digests (level 0)."""
    if len(leaves) != shape.blocks * DIGEST_SIZE:
        raise ManifestError(f"{len(leaves) // DIGEST_SIZE} leaf digests for {shape.blocks} blocks")
    levels = [bytes(leaves)]
    for _ in range(shape.top_level):
        below = memoryview(levels[-1])
        levels.append(
            b"".join(
                node_digest(below[start : start + PAGE_SIZE])
                for start in range(0, len(below), PAGE_SIZE)
            )
        )
    return levels


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """A whole manifest in memory: its header and every level of its tree."""

    version: int
    created_ns: int
    size: int
    block_size: int
    levels: tuple[bytes, ...]
    root: bytes

    @classmethod
    def build(
        cls, version: int, created_ns: int, size: int, block_size: int, leaves: bytes
    ) -> Manifest:
        shape = Shape.of(size, block_size)
        levels = build_levels(leaves, shape)
        top = node_digest(levels[-1])
        return cls(
            version, created_ns, size, block_size, tuple(levels),
            root_digest(version, created_ns, size, block_size, top),
        )

    @property
    def shape(self) -> Shape:
        return Shape.of(self.size, self.block_size)

    @property
    def identity(self) -> ReplicaIdentity:
        return ReplicaIdentity(
            self.version, self.created_ns, self.size, self.root, self.block_size
        )

    def leaf(self, index: int) -> bytes:
        start = index * DIGEST_SIZE
        return self.levels[0][start : start + DIGEST_SIZE]

    def page(self, level: int, page: int) -> bytes:
        length = self.shape.page_length(level, page)
        start = page * PAGE_SIZE
        return self.levels[level][start : start + length]

    def with_leaves(self, changed: dict[int, bytes]) -> Manifest:
        """The manifest after blocks were rewritten (a Private Image): only the pages on the
        paths of the changed blocks are hashed again, never the whole image."""
        shape = self.shape
        levels = [bytearray(level) for level in self.levels]
        dirty = set()
        for index, digest in changed.items():
            if not 0 <= index < shape.blocks or len(digest) != DIGEST_SIZE:
                raise ManifestError(f"no block {index}, or a digest of the wrong size")
            levels[0][index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
            dirty.add(index // FANOUT)
        for level in range(shape.top_level):
            above = set()
            for page in sorted(dirty):
                start = page * PAGE_SIZE
                digest = node_digest(levels[level][start : start + PAGE_SIZE])
                levels[level + 1][page * DIGEST_SIZE : (page + 1) * DIGEST_SIZE] = digest
                above.add(page // FANOUT)
            dirty = above
        top = node_digest(levels[-1])
        root = root_digest(self.version, self.created_ns, self.size, self.block_size, top)
        return dataclasses.replace(self, levels=tuple(bytes(level) for level in levels), root=root)

    def restamped(self, version: int, created_ns: int) -> Manifest:
        """The same content as a new version: a new root, so not identical to this one."""
        return Manifest.build(version, created_ns, self.size, self.block_size, self.levels[0])

    # -- the file format (docs/protocol.md, "Manifest") ---------------------------------------

    def encode(self) -> bytes:
        header = _HEADER.pack(
            MAGIC, FORMAT, ALGORITHM_BLAKE3, 0, self.version, self.created_ns, self.size,
            self.block_size, FANOUT, self.root,
        )
        return header + b"".join(self.levels)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and check a whole manifest file: every level must follow from level 0 and
        the root from the top, so a damaged manifest is refused, never trusted."""
        header = decode_header(data)
        version, created_ns, size, block_size, root = header
        shape = Shape.of(size, block_size)
        expected = HEADER_SIZE + sum(shape.counts) * DIGEST_SIZE
        if len(data) != expected:
            raise ManifestError(f"manifest of {len(data)} bytes, its header implies {expected}")
        leaves = bytes(memoryview(data)[HEADER_SIZE : HEADER_SIZE + shape.blocks * DIGEST_SIZE])
        manifest = cls.build(version, created_ns, size, block_size, leaves)
        if manifest.root != root or HEADER_SIZE + len(b"".join(manifest.levels)) != expected:
            raise ManifestError("manifest root does not match its digests (damaged manifest)")
        stored = memoryview(data)[HEADER_SIZE:]
        if stored != b"".join(manifest.levels):
            raise ManifestError("manifest levels do not follow from its leaves (damaged)")
        return manifest


def decode_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, bytes]:
    """Version, creation time, size, block size and root from a manifest's first bytes."""
    if len(data) < HEADER_SIZE:
        raise ManifestError("manifest shorter than its header")
    magic, fmt, algorithm, _reserved, version, created_ns, size, block_size, fanout, root = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise ManifestError("not a pvs manifest (bad magic)")
    if fmt != FORMAT or algorithm != ALGORITHM_BLAKE3 or fanout != FANOUT:
        raise ManifestError(
            f"manifest format {fmt}, algorithm {algorithm}, fanout {fanout}: this pvs reads "
            f"format {FORMAT}, algorithm {ALGORITHM_BLAKE3}, fanout {FANOUT}"
        )
    check_block_size(block_size)
    return version, created_ns, size, block_size, root


def level_offset(shape: Shape, level: int) -> int:
    """Where ``level`` begins in a manifest file."""
    return HEADER_SIZE + sum(shape.counts[:level]) * DIGEST_SIZE


def hash_blocks(data: bytes | bytearray | memoryview, block_size: int) -> Iterable[bytes]:
    """Leaf digests of consecutive blocks of ``data`` (the last may be short)."""
    view = memoryview(data)
    for start in range(0, len(view), block_size):
        yield leaf_digest(view[start : start + block_size])


# -- checking what a server sends (the target's side) ------------------------------------------


class Verifier:
    """Checks blocks against a pinned root, learning pages of the tree as it needs them.

    Sans-IO: ``needed(block)`` says which page to fetch next (or None once the block's digest
    is known), ``add_page`` checks a fetched page against its parent (or the root), and
    ``check`` compares a block with its digest. Level-0 pages are kept in a bounded LRU, the
    upper levels (a 128th of the size) for good.
    """

    def __init__(self, identity: ReplicaIdentity, *, cached_pages: int = 4096) -> None:
        self.identity = identity
        self.shape = Shape.of(identity.size, identity.block_size)
        self._upper: dict[tuple[int, int], bytes] = {}
        self._leaves: OrderedDict[int, bytes] = OrderedDict()
        self._limit = max(cached_pages, 1)

    def needed(self, block: int) -> tuple[int, int] | None:
        """The page to fetch next to learn block ``block``'s digest: (level, page)."""
        if not 0 <= block < self.shape.blocks:
            raise ManifestError(f"no block {block}")
        if block // FANOUT in self._leaves:
            return None
        index, wanted = block // FANOUT, (0, block // FANOUT)
        for level in range(1, self.shape.top_level + 1):
            if (level, index // FANOUT) in self._upper:
                return wanted
            index, wanted = index // FANOUT, (level, index // FANOUT)
        return wanted

    def missing(self, blocks: Iterable[int]) -> list[tuple[int, int]]:
        """The pages to fetch next for all of ``blocks``, each once (one round: fetch them,
        add them, and ask again until this is empty)."""
        pages: dict[tuple[int, int], None] = {}
        for block in blocks:
            page = self.needed(block)
            if page is not None:
                pages[page] = None
        return list(pages)

    def add_page(self, level: int, page: int, data: bytes | bytearray | memoryview) -> None:
        """Accept a page the server sent, once it is proved; ManifestError if it is not."""
        shape = self.shape
        if len(data) != shape.page_length(level, page):
            raise ManifestError(f"page {page} of level {level} has the wrong length")
        digest = node_digest(data)
        if level == shape.top_level:
            identity = self.identity
            expected = root_digest(
                identity.version, identity.timestamp_ns, identity.size, identity.block_size,
                digest,
            )
            if expected != identity.digest:
                raise ManifestError("top page does not lead to the pinned root")
        else:
            parent = self._upper.get((level + 1, page // FANOUT))
            if parent is None:
                raise ManifestError(f"page {page} of level {level} arrived before its parent")
            at = (page % FANOUT) * DIGEST_SIZE
            if parent[at : at + DIGEST_SIZE] != digest:
                raise ManifestError(f"page {page} of level {level} does not match its parent")
        if level == 0:
            self._leaves[page] = bytes(data)
            self._leaves.move_to_end(page)
            while len(self._leaves) > self._limit:
                self._leaves.popitem(last=False)
        else:
            self._upper[(level, page)] = bytes(data)

    def digest_of(self, block: int) -> bytes | None:
        page = self._leaves.get(block // FANOUT)
        if page is None:
            return None
        at = (block % FANOUT) * DIGEST_SIZE
        return page[at : at + DIGEST_SIZE]

    def bad_blocks(
        self, offset: int, data: bytes | bytearray | memoryview
    ) -> list[int]:
        """The blocks of ``data`` (block-aligned at ``offset``, whole blocks, the image's last
        one possibly short) that do not match their digests. Every digest must be known
        (``missing`` empty); an unknown one counts as bad."""
        shape = self.shape
        if offset % shape.block_size:
            raise ManifestError(f"offset {offset} is not block-aligned")
        view = memoryview(data)
        bad = []
        first = offset // shape.block_size
        leaves = self._leaves
        for position in range(0, len(view), shape.block_size):
            block = first + position // shape.block_size
            page = leaves.get(block // FANOUT)
            at = (block % FANOUT) * DIGEST_SIZE
            piece = view[position : position + shape.block_size]
            if page is None or page[at : at + DIGEST_SIZE] != leaf_digest(piece):
                bad.append(block)
        return bad


def aligned(shape: Shape, offset: int, length: int) -> tuple[int, int]:
    """The smallest block-aligned range covering ``offset`` .. ``offset + length``, cut at the
    end of the image: what must be fetched so that every byte handed out can be checked."""
    start = offset - offset % shape.block_size
    end = min(-(-(offset + length) // shape.block_size) * shape.block_size, shape.size)
    return start, end - start


def first_mismatch(manifest: Manifest, digests: Sequence[bytes], first_block: int = 0) -> int:
    """Index of the first block whose digest differs from the manifest's, or -1."""
    for position, digest in enumerate(digests):
        if manifest.leaf(first_block + position) != digest:
            return first_block + position
    return -1
