"""What a target is sent, written once per burst: pvsd's sessions and its stream workers'.

The replies to every request decoded from one read are gathered and written with one
``writelines`` when the burst ends (``flush``), instead of one system call each; past
``BATCH_BYTES`` they are written at once, so that the transport can apply backpressure
(``pause_writing``) before a burst of large reads piles up. Outside a burst (a reply from a
worker thread, a notice from the server) each event is written as it comes.
"""

from __future__ import annotations

import asyncio

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.buffers import Buffer, Lent
from pvs_protocol.connection import Connection
from pvs_protocol.errors import ProtocolError
from pvs_protocol.manifest import ManifestError
from pvsd.manifest import ManifestFile

log = structlog.get_logger("pvsd.replies")

BATCH_BYTES = 1024 * 1024
"""Replies of one burst gathered before a write: four 256 KiB replies (nbdcopy's size) in
one writev cost less CPU than four writes (nbdcopy's CPU per GiB went from 1.18x to 1.0x the
two nbdkits' in bench/run.py)."""


class Replies:
    """The outgoing side of one target connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.lent: Lent | None = None
        """Pooled read buffers in replies, back to the pool once the transport is done."""
        self._batch: list[Buffer] | None = None
        self._batched = 0

    def attach(self, transport: asyncio.Transport, lent: Lent | None = None) -> None:
        self.transport, self.lent = transport, lent

    def detach(self) -> None:
        """The connection is gone (or handed over): nothing more is written."""
        if self.lent is not None:
            self.lent.close()
        self.transport = None

    def burst(self) -> None:
        """Requests decoded from here on are answered together, at ``flush``."""
        self._batch = []

    def send(self, event: ev.Event, log: FilteringBoundLogger = log) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            buffers = self.conn.send_buffers(wire.fit_site(event))
        except ProtocolError as error:  # our own bug: say so loudly, and end this connection
            log.error("internal_protocol_error", error=str(error))
            transport.abort()
            return
        if self._batch is None:
            self._write(buffers)
            return
        self._batch += buffers
        self._batched += sum(len(b) for b in buffers)
        if self._batched >= BATCH_BYTES:
            self.flush()
            self._batch = []

    def flush(self) -> None:
        """Write what the burst gathered; later events are written as they come."""
        batch, self._batch = self._batch, None
        self._batched = 0
        if batch:
            self._write(batch)

    def _write(self, buffers: list[Buffer]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(buffers)
        if self.lent is not None:
            self.lent.wrote(buffers)


def digest_page(manifest: ManifestFile, request: ev.Digests) -> bytes | str:
    """The manifest page a DIGESTS asks for, or why it is out of range (an OUT_OF_RANGE
    message); OSError if the manifest file cannot be read."""
    try:
        length = manifest.shape.page_length(request.level, request.page)
    except ManifestError as error:
        return str(error)
    if length != request.length:
        return (f"page {request.page} of level {request.level} is {length} bytes, not "
                f"{request.length}")
    return manifest.page(request.level, request.page)
