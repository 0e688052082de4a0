"""A minimal NBD client, to read an export the way an outside reader would.

Fixed newstyle handshake, NBD_OPT_GO for the default export, simple replies, READ only, with
the byte layouts of ``wire.py``. Requests are pipelined; each read's wait runs from writing
its request to the moment its reply was decoded (the receiving task's clock), so that the
caller's own scheduling afterwards does not count. The fault tests and ``bench/faults.py``
measure with it what a machine's block device would wait during a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path

from pvs_target.nbd import wire as nbd


class NbdFailed(Exception):
    """The export answered a read with an error, refused the handshake, or the connection
    ended."""


class NbdClient:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int
    ) -> None:
        self.reader, self.writer, self.size = reader, writer, size
        self._handles = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[tuple[int, bytes, float]], int]] = {}
        self._receiver = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> NbdClient:
        """Connect to the export listening on the Unix socket ``path``."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path))
            magic, option_magic, flags = nbd.GREETING.unpack(
                await reader.readexactly(nbd.GREETING.size)
            )
            if (magic, option_magic) != (nbd.NBDMAGIC, nbd.IHAVEOPT):
                writer.close()
                raise NbdFailed(f"{path} is not an NBD server")
            ours = nbd.ClientFlag.FIXED_NEWSTYLE | (flags & nbd.ClientFlag.NO_ZEROES)
            writer.write(nbd.CLIENT_FLAGS.pack(ours))
            request = nbd.U32.pack(0) + nbd.U16.pack(0)  # the default export, no info asked
            writer.write(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.Option.GO, len(request))
                         + request)
            size = None
            for _ in range(64):
                _, _, kind, length = nbd.OPTION_REPLY.unpack(
                    await reader.readexactly(nbd.OPTION_REPLY.size)
                )
                payload = await reader.readexactly(length)
                if kind == nbd.Reply.ACK:
                    break
                if kind != nbd.Reply.INFO:
                    writer.close()
                    raise NbdFailed(f"NBD_OPT_GO refused: reply {kind:#x} {payload!r}")
                if nbd.U16.unpack_from(payload)[0] == nbd.Info.EXPORT:
                    size = nbd.INFO_EXPORT.unpack(payload)[1]
            if size is None:
                writer.close()
                raise NbdFailed("no NBD_INFO_EXPORT before the ACK of NBD_OPT_GO")
        return cls(reader, writer, size)

    async def read(self, offset: int, length: int) -> tuple[bytes, float]:
        """The bytes and the wait in seconds; NbdFailed if the export answered an error."""
        loop = asyncio.get_running_loop()
        handle = next(self._handles)
        future: asyncio.Future[tuple[int, bytes, float]] = loop.create_future()
        self._waiting[handle] = (future, length)
        started = loop.time()
        self.writer.write(nbd.REQUEST.pack(
            nbd.REQUEST_MAGIC, 0, nbd.CommandKind.READ, handle, offset, length
        ))
        error, data, ended = await future
        if error:
            raise NbdFailed(f"NBD error {error} after {ended - started:.3f} s")
        return data, ended - started

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                magic, error, handle = nbd.SIMPLE_REPLY.unpack(
                    await self.reader.readexactly(nbd.SIMPLE_REPLY.size)
                )
                if magic != nbd.SIMPLE_REPLY_MAGIC:
                    raise ConnectionError(f"bad reply magic {magic:#x}")
                future, length = self._waiting.pop(handle)
                data = b"" if error else await self.reader.readexactly(length)
                if not future.done():
                    future.set_result((error, data, loop.time()))
        except (asyncio.IncompleteReadError, ConnectionError, KeyError) as failure:
            for future, _ in self._waiting.values():
                if not future.done():
                    future.set_exception(NbdFailed(f"NBD connection ended: {failure!r}"))
            self._waiting.clear()

    async def close(self) -> None:
        self._receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._receiver
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
