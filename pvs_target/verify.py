"""Every block a target hands out is checked first: the I/O side of ``manifest.Verifier``.

A server could send wrong bytes with a valid CRC-32 (or negotiate no checksum at all), and
its disk could rot below the file system: only a digest the target can check against the
identity it pinned at login proves a block. ``ReadVerifier`` holds one pinned identity for
the life of a stream (across failovers: every server it moves to must carry the same
manifest root) and, for a read:

1. widens it to whole manifest blocks (``manifest.aligned``), since a digest covers a block;
2. makes sure the digests of those blocks are known, fetching the missing pages of the tree
   with DIGESTS from the current connection, level by level from the top, each proved against
   its parent or the root (a page wanted by several reads at once is fetched once);
3. checks every block, and hands out only the bytes asked for, and only once checked.

A page that fails its proof or a block that fails its digest is never handed out: the
server is told (DAMAGED) and the read fails with ``BlockMismatch``, on which the failover
layer drops that server for this vDisk and reads again elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Protocol, cast

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol import events as ev
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.manifest import FANOUT, ManifestError, Shape, Verifier, aligned
from pvs_target.connection import BUFFERS, ClientError

Data = bytes | bytearray
"""What a read hands out: a buffer of its own (a pooled one when large)."""


class BlockMismatch(ClientError):
    """A server sent a block (or a digest page) that does not match the pinned manifest."""

    def __init__(self, server: str, address: str, block: int, offset: int, message: str) -> None:
        super().__init__(
            f"{server} at {address} sent block {block} (offset {offset}) that does not match "
            f"the manifest: {message}"
        )
        self.server = server
        self.address = address
        self.block = block
        self.offset = offset
        self.message = message


class PageMismatch(BlockMismatch):
    """A digest page failed its proof: the server's manifest (not the pinned one) is wrong.
    ``block`` is the first block the page covers, the one named in the DAMAGED report."""


class DigestsUnknown(ClientError):
    """A digest needed to check a block was dropped from the cache in the meantime (the page
    cache is bounded): fetch it again, then check; nothing is wrong with the server."""


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    """One mismatch seen, for ``pvs-target status``."""

    at: float
    """Wall-clock time."""
    server: str
    address: str
    block: int
    offset: int
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "server": self.server,
            "address": self.address,
            "block": self.block,
            "offset": self.offset,
            "message": self.message,
        }


class Source(Protocol):
    """What the verifier needs of a connection (``StreamConnection`` is one; a test may
    script one in memory)."""

    @property
    def server(self) -> str: ...
    @property
    def hello_reply(self) -> ev.HelloReply | None: ...
    @property
    def max_request(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...
    async def digests(self, level: int, page: int, length: int) -> bytes | bytearray: ...
    def report_damaged(self, block: int, message: str) -> None: ...


def server_name(connection: Source) -> str:
    reply = connection.hello_reply
    return reply.server_name if reply is not None else connection.server


class ReadVerifier:
    """Checks the reads of one stream against one pinned manifest root."""

    def __init__(
        self,
        identity: ReplicaIdentity,
        *,
        cached_pages: int = 4096,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        self.identity = identity
        self.verifier = Verifier(identity, cached_pages=cached_pages)
        self.shape: Shape = self.verifier.shape
        self._log: FilteringBoundLogger = log or structlog.get_logger("pvs_target.verify")
        self.blocks_checked = 0
        self.pages_fetched = 0
        self.mismatches: list[Mismatch] = []
        self.dropped: dict[str, str] = {}
        """Servers (name -> address) that sent a bad block or page: never used again for
        this vDisk while the target runs."""
        self._fetching: dict[tuple[int, int], asyncio.Future[BaseException | None]] = {}

    # -- what a read needs ------------------------------------------------------------------

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """The block-aligned range to fetch so that every byte of the read can be checked."""
        return aligned(self.shape, offset, length)

    def known(self, start: int, length: int) -> bool:
        """Whether every digest of the blocks of ``start`` .. ``start + length`` is known."""
        digest_of = self.verifier.digest_of
        return all(digest_of(block) is not None for block in self._page_blocks(start, length))

    def _page_blocks(self, start: int, length: int) -> list[int]:
        """One block of each leaf page the range touches: a page is known or not as a whole."""
        blocks = self.shape.blocks_of(start, length)
        if not blocks:
            return []
        first, last = blocks.start, blocks.stop - 1
        return [max(first, page * FANOUT) for page in range(first // FANOUT, last // FANOUT + 1)]

    async def ensure(self, connection: Source, start: int, length: int) -> None:
        """Learn the digests of the blocks of the range, in rounds (one per level still
        missing); pages already being fetched for another read are waited for, not asked
        for twice. Raises PageMismatch (after telling the server) if a page fails its proof,
        or whatever ended the connection."""
        blocks = self._page_blocks(start, length)
        while missing := self.verifier.missing(blocks):
            theirs = [self._fetching[page] for page in missing if page in self._fetching]
            loop = asyncio.get_running_loop()
            fetches = []
            claimed: dict[tuple[int, int], asyncio.Future[BaseException | None]] = {}
            for key in missing:
                if key not in self._fetching:  # claimed now, before any await: fetched once
                    self._fetching[key] = claimed[key] = loop.create_future()
                    fetches.append(self._fetch_page(connection, *key))
            try:
                results = await asyncio.gather(
                    *fetches, *(asyncio.shield(future) for future in theirs),
                    return_exceptions=True,
                )
            finally:  # a fetch cancelled before it began must not leave its waiters hanging
                for key, future in claimed.items():
                    if not future.done():
                        if self._fetching.get(key) is future:
                            del self._fetching[key]
                        future.set_result(None)
            # Our own failures are ours to raise; another read's fetch that failed is that
            # read's business: this one asks again on its own connection in the next round.
            for result in results[: len(fetches)]:
                if isinstance(result, BaseException):
                    raise result

    async def _fetch_page(self, connection: Source, level: int, page: int) -> None:
        key = (level, page)
        outcome: BaseException | None = None
        try:
            data = await connection.digests(level, page, self.shape.page_length(level, page))
            self.pages_fetched += 1
            try:
                self.verifier.add_page(level, page, data)
            except ManifestError as wrong:  # not `error`: compiled, mypyc confuses the two
                block = page * FANOUT ** (level + 1)
                offset = block * self.shape.block_size
                message = f"digest page {page} of level {level}: {wrong}"
                connection.report_damaged(block, message)
                raise PageMismatch(
                    server_name(connection), connection.server, block, offset, message
                ) from None
        except asyncio.CancelledError:
            raise  # the waiters see None and fetch it themselves
        except BaseException as error:
            outcome = error
            raise
        finally:
            self._fetching.pop(key).set_result(outcome)

    # -- checking ---------------------------------------------------------------------------

    def accept(
        self, connection: Source, start: int, data: Data, offset: int, length: int
    ) -> Data:
        """The bytes ``offset`` .. ``offset + length`` of ``data`` (the aligned range read at
        ``start``), once every block of it matches its digest. Raises BlockMismatch (after
        telling the server with DAMAGED) or DigestsUnknown. The buffer returned is the
        caller's alone: ``data`` itself when nothing was cut, else a copy, and ``data`` then
        goes back to the pool (nobody else holds it)."""
        self.check(connection, start, data)
        return self.hand_out(data, start, offset, length)

    def check(self, connection: Source, start: int, data: Data) -> None:
        verifier = self.verifier
        bad = verifier.bad_blocks(start, data)
        block_size = self.shape.block_size
        self.blocks_checked += -(-len(data) // block_size) - len(bad)
        if not bad:
            return
        wrong = [block for block in bad if verifier.digest_of(block) is not None]
        if not wrong:
            raise DigestsUnknown(f"digests of blocks {bad[0]}.. left the cache: fetch again")
        block = wrong[0]
        message = (
            f"block {block} does not match its digest in manifest "
            f"{self.identity.digest.hex()[:16]} ({len(wrong)} bad in this read)"
        )
        connection.report_damaged(block, message)
        raise BlockMismatch(
            server_name(connection), connection.server, block, block * block_size, message
        )

    @staticmethod
    def hand_out(data: Data, start: int, offset: int, length: int) -> Data:
        if start == offset and len(data) == length:
            return data
        piece = BUFFERS.take(length)
        at = offset - start
        piece[:] = memoryview(data)[at : at + length]
        BUFFERS.give([data])
        return piece

    # -- reading ----------------------------------------------------------------------------

    async def read(self, connection: Source, offset: int, length: int) -> Data:
        """Read and check ``length`` bytes at ``offset`` (within the image) on ``connection``;
        the aligned range must fit in ``max_request`` or is read in pieces."""
        if offset < 0 or length <= 0 or offset + length > self.shape.size:
            raise ValueError(f"read of {length} bytes at {offset} outside the image")
        start, span = self.span(offset, length)
        if self.known(start, span):
            data = await self._fetch(connection, start, span)
        else:  # the data and the digests in the same round trip
            # gather returns a list where typeshed says tuple, and compiled (setup.py) this
            # line checks the type it was told
            results: list[Any] = await cast(Any, asyncio.gather(
                self.ensure(connection, start, span), self._fetch(connection, start, span),
                return_exceptions=True,
            ))
            pages, fetched = results
            if isinstance(pages, BaseException):
                raise pages
            if isinstance(fetched, BaseException):
                raise fetched
            data = fetched
        while True:
            try:
                return self.accept(connection, start, data, offset, length)
            except DigestsUnknown:
                await self.ensure(connection, start, span)

    @staticmethod
    async def _fetch(connection: Source, start: int, length: int) -> Data:
        step = connection.max_request
        if length <= step:
            return await connection.read(start, length)
        # blocks larger than the server's requests (a 1 MiB block, 256 KiB requests)
        parts = await asyncio.gather(
            *(connection.read(at, min(step, start + length - at))
              for at in range(start, start + length, step))
        )
        return b"".join(parts)

    # -- what went wrong --------------------------------------------------------------------

    def record(self, error: BlockMismatch) -> bool:
        """Remember a mismatch and drop its server; True the first time for that server
        (logged then, once per server: a damaged disk would otherwise flood the log)."""
        self.mismatches.append(
            Mismatch(time.time(), error.server, error.address, error.block, error.offset,
                     error.message)
        )
        del self.mismatches[:-100]
        first = error.server not in self.dropped
        self.dropped[error.server] = error.address
        if first:
            self._log.error(
                "block_mismatch", server=error.server, address=error.address,
                block=error.block, offset=error.offset, detail=error.message,
                action="told the server (DAMAGED), dropped it for this vDisk, reading again "
                "from another server",
                hint="run 'pvsctl vdisk verify' on that server's copy and replace it with a "
                "good replica",
            )
        return first

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "root": self.identity.digest.hex(),
            "block_size": self.shape.block_size,
            "blocks": self.shape.blocks,
            "blocks_checked": self.blocks_checked,
            "pages_fetched": self.pages_fetched,
            "mismatches": [mismatch.to_json() for mismatch in self.mismatches],
            "dropped_servers": [
                {"name": name, "address": address} for name, address in self.dropped.items()
            ],
        }


__all__ = [
    "BlockMismatch",
    "DigestsUnknown",
    "Mismatch",
    "PageMismatch",
    "ReadVerifier",
    "Source",
]
