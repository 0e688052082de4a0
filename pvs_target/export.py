"""The attached vDisk as an NBD export: the failover stream below, the write cache on top.

Standard Image: the vDisk is read-only on the server; the machine's writes land in its local
write cache and reads merge the cache over the stream, so writes survive every failover.
Private Image: writes go through to the server's image and FLUSH makes them durable there.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import structlog

from pvs_target.cache import CacheFull, WriteCache
from pvs_target.connection import BUFFERS, Done
from pvs_target.failover import GaveUp, VDiskStream
from pvs_target.nbd.server import (
    HANDSHAKE_TIMEOUT,
    MAX_CLIENTS,
    BackendError,
    NbdServer,
    serve_nbd,
)

log = structlog.get_logger("pvs_target.export")

Data = bytes | bytearray | memoryview


@dataclasses.dataclass
class StreamBackend:
    """NBD backend over a VDiskStream, with a write cache for read-only (Standard) images."""

    stream: VDiskStream
    cache: WriteCache | None

    @property
    def size(self) -> int:
        return self.stream.size

    @property
    def read_only(self) -> bool:
        return self.stream.read_only and self.cache is None

    @property
    def block_size(self) -> int:
        return self.stream.block_size

    @property
    def multi_conn(self) -> bool:
        # One process serves every NBD connection from one cache or one server session:
        # a FLUSH on any connection covers the writes of all.
        return True

    async def read(self, offset: int, length: int) -> Data:
        try:
            if self.cache is not None:
                return await self.cache.read(offset, length, self.stream.read)
            return await self.stream.read(offset, length)
        except GaveUp as error:
            raise _gave_up(error) from None

    async def _to_server(self, work: Awaitable[None]) -> None:
        try:
            await work
        except GaveUp as error:
            raise _gave_up(error) from None

    def read_now(self, offset: int, length: int, done: Done) -> bool:
        """The fast path of ``read`` (see ``VDiskStream.read_now``), where the write cache
        has nothing of the range."""
        if self.cache is not None and not self.cache.untouched(offset, length):
            return False
        return self.stream.read_now(offset, length, done)

    def submitted(self) -> None:
        """A burst of requests has been handed over: send what ``read_now`` queued."""
        self.stream.send_queued()

    def waited(self, started: float, ended: float) -> None:
        """An NBD client waited from ``started`` to ``ended`` for a reply: the stream keeps
        the longest, overall and per failover, for its status."""
        self.stream.waited(started, ended)

    def release(self, buffers: list[object]) -> None:
        """The export has written these (what ``read`` returned) to its clients."""
        BUFFERS.give(buffers)

    async def write(self, offset: int, data: Data, fua: bool) -> None:
        if self.cache is not None:
            self._cached(lambda cache: cache.write(offset, data))
            return
        await self._to_server(self.stream.write(offset, data))
        if fua:
            await self._to_server(self.stream.flush())

    async def flush(self) -> None:
        if self.cache is None:
            await self._to_server(self.stream.flush())

    async def trim(self, offset: int, length: int) -> None:
        if self.cache is not None:
            self._cached(lambda cache: cache.trim(offset, length))
        # a trim on a Private Image is a hint the server may ignore: do nothing

    async def write_zeroes(self, offset: int, length: int, may_trim: bool) -> None:
        if self.cache is not None:
            self._cached(lambda cache: cache.zero(offset, length))
            return
        step = 1 << 20
        for at in range(offset, offset + length, step):
            await self.stream.write(at, bytes(min(step, offset + length - at)))

    def _cached(self, change: object) -> None:
        assert self.cache is not None
        try:
            change(self.cache)  # type: ignore[operator]
        except CacheFull as full:  # logged by the cache once as it fills, not once a write
            failure = BackendError(full.errno or errno.ENOSPC, str(full))
            failure.logged = True
            raise failure from None


def _gave_up(error: GaveUp) -> BackendError:
    """EIO for the client, logged once by the stream when it gave up, not once per request."""
    failure = BackendError(errno.EIO, str(error))
    failure.logged = True
    return failure


def make_cache(
    stream: VDiskStream, kind: Literal["ram", "file", "ram+overflow"], limit: int,
    ram_limit: int, directory: str | None,
) -> WriteCache | None:
    if not stream.read_only:
        return None  # Private Image: writes go to the server
    return WriteCache(
        kind, stream.size, limit, directory=directory,
        ram_limit=min(ram_limit, limit) if kind == "ram+overflow" else None,
    )


async def start_export(
    stream: VDiskStream, address: str, args: argparse.Namespace
) -> NbdServer:
    cache = make_cache(
        stream, args.cache, args.cache_size, args.cache_ram, args.cache_dir or None
    )
    backend = StreamBackend(stream, cache)
    server = await serve_nbd(
        backend, address, stream.vdisk,
        description=f"pvs vDisk {stream.vdisk}", log=log,
        max_clients=getattr(args, "nbd_max_clients", MAX_CLIENTS),
        handshake_timeout=getattr(args, "nbd_handshake_timeout", HANDSHAKE_TIMEOUT),
    )
    log.info(
        "nbd_export_ready", address=address, vdisk=stream.vdisk, size=stream.size,
        cache=args.cache if cache else "none (writes go to the server)",
        read_only=backend.read_only, pid=os.getpid(),
    )
    return server


def add_nbd_options(attach: argparse.ArgumentParser) -> None:
    """The export's bounds, as options of ``pvs-target attach``."""
    attach.add_argument(
        "--nbd-max-clients", type=_positive(int), default=MAX_CLIENTS, metavar="COUNT",
        help="NBD connections kept at most; at the cap a new one replaces the oldest still in "
        "its handshake, or is refused (default %(default)s)",
    )
    attach.add_argument(
        "--nbd-handshake-timeout", type=_positive(float), default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS", help="an NBD client that has not finished its handshake after this "
        "long is dropped (default %(default)g)",
    )


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
        return value

    return parse


def export_status(server: NbdServer) -> dict[str, Any]:
    """The export's part of ``pvs-target status``: its NBD clients and its write cache."""
    cache = getattr(server.backend, "cache", None)
    return {
        "nbd": server.status(),
        "write_cache": cache.status() if isinstance(cache, WriteCache) else None,
    }


def status_lines(status: dict[str, Any]) -> list[tuple[str, str]]:
    """The lines ``pvs-target status`` prints for ``export_status`` (none without an export)."""
    lines: list[tuple[str, str]] = []
    cache = status.get("write_cache")
    if cache:
        full = " FULL: writes fail with ENOSPC" if cache["refused_writes"] else ""
        lines.append((
            "write cache", f"{_mib(cache['used'])} of {_mib(cache['limit'])} used "
            f"({cache['percent']}%, {cache['kind']}){full}",
        ))
    nbd = status.get("nbd")
    if nbd:
        dropped = nbd["refused"] + nbd["evicted"] + nbd["handshake_timeouts"]
        lines.append((
            "NBD clients", f"{nbd['clients']} of at most {nbd['max_clients']} at "
            f"{nbd['address']}" + (f", {dropped} dropped or refused" if dropped else ""),
        ))
    return lines


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"
