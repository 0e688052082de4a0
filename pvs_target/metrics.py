"""What ``pvs-target attach`` tells the outside while it runs: Prometheus metrics at
``http://HOST:PORT/metrics`` (with ``--metrics HOST:PORT``) and systemd's readiness, status and
watchdog (under ``Type=notify``, see `pvsd.sd_notify`).

Every metric is read at scrape time from what the stream, the write cache and the NBD export
keep anyway, on the event loop: streaming pays nothing for it. The endpoint has no
authentication; it is read-only and tells no secret (the vDisk, the device id, the servers,
counts). Bind it to loopback or a management network (``--metrics 127.0.0.1:9911``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pvs_protocol.addresses import Address, format_address
from pvs_target import failover_core
from pvsd import sd_notify

if TYPE_CHECKING:
    from pvs_target.cache import WriteCache
    from pvs_target.failover import VDiskStream
    from pvs_target.nbd.server import NbdServer

log = structlog.get_logger("pvs_target.metrics")

PATH = "/metrics"
FAILOVER_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
"""Seconds a failover took, from the old server's last sign of life to the new session."""
PLANNED = "relogin requested"
"""How a planned move's reason begins (`pvs_target.failover_core`)."""


class TargetCollector(Collector):
    def __init__(self, stream: VDiskStream, export: NbdServer | None) -> None:
        self.stream = stream
        self.export = export

    def collect(self) -> Iterable[Metric]:
        stream = self.stream
        info = GaugeMetricFamily(
            "pvs_target_info", "The attached vDisk and this machine's device id (always 1).",
            labels=["vdisk", "device_id"],
        )
        info.add_metric([stream.vdisk, stream.device_id], 1)
        yield info
        state = GaugeMetricFamily(
            "pvs_target_state", "The stream's state (1 for the current one).", labels=["state"]
        )
        for each in failover_core.State:
            state.add_metric([each.value], 1 if stream.core.state is each else 0)
        yield state
        server = GaugeMetricFamily(
            "pvs_target_server", "The server streamed from now (1; none while without one).",
            labels=["server", "address"],
        )
        session = stream.session
        if session is not None:
            server.add_metric([session.server_name, session.connected_to], 1)
        yield server
        yield GaugeMetricFamily(
            "pvs_target_in_flight", "Requests sent to the server and not answered yet.",
            value=session.connection.in_flight if session is not None else 0,
        )
        yield CounterMetricFamily(
            "pvs_target_requests", "Requests to the servers (reads, writes, flushes).",
            value=stream.requests,
        )
        yield CounterMetricFamily(
            "pvs_target_read_bytes", "Bytes read from the servers.", value=stream.bytes_read
        )
        yield CounterMetricFamily(
            "pvs_target_written_bytes", "Bytes written to the server (Private Images).",
            value=stream.bytes_written,
        )
        yield CounterMetricFamily(
            "pvs_target_retried_requests", "Requests sent again on another session after a "
            "failover or a bad block.", value=stream.retried,
        )
        yield GaugeMetricFamily(
            "pvs_target_longest_wait_seconds", "The longest any request waited, from its "
            "arrival to its answer, since the attach.", value=stream.longest_wait_ms / 1000,
        )
        yield from self._failovers()
        verification = stream.verification
        yield CounterMetricFamily(
            "pvs_target_verified_blocks", "Blocks checked against the manifest.",
            value=verification.blocks_checked if verification is not None else 0,
        )
        yield from self._export()

    def _failovers(self) -> Iterator[Metric]:
        history = self.stream.history
        count = CounterMetricFamily(
            "pvs_target_failovers", "Moves to another server: planned (the server asked, "
            "RELOGIN) or unplanned (the server was lost).", labels=["kind"],
        )
        planned = sum(1 for record in history if record.reason.startswith(PLANNED))
        count.add_metric(["planned"], planned)
        count.add_metric(["unplanned"], len(history) - planned)
        yield count
        took = sorted(record.took_ms / 1000 for record in history)
        buckets = [
            (f"{bound:g}", float(sum(1 for seconds in took if seconds <= bound)))
            for bound in FAILOVER_BOUNDS
        ]
        yield HistogramMetricFamily(
            "pvs_target_failover_duration_seconds", "How long each failover took, from the "
            "old server's last sign of life to the new session.",
            buckets=[*buckets, ("+Inf", float(len(took)))], sum_value=sum(took),
        )

    def _export(self) -> Iterator[Metric]:
        export = self.export
        if export is None:
            return
        yield GaugeMetricFamily(
            "pvs_target_nbd_connections", "NBD clients connected to the export.",
            value=len(export.connections),
        )
        cache: WriteCache | None = getattr(export.backend, "cache", None)
        if cache is None:  # Private Image: writes go to the server
            return
        yield GaugeMetricFamily(
            "pvs_target_write_cache_used_bytes", "Bytes the write cache holds (a full cache "
            "fails writes with ENOSPC).", value=cache.used,
        )
        yield GaugeMetricFamily(
            "pvs_target_write_cache_limit_bytes", "The write cache's limit (--cache-size).",
            value=cache.limit,
        )


class Reporting:
    """The metrics endpoint and the systemd supervision of one attach; `close` ends both."""

    def __init__(self, stream: VDiskStream) -> None:
        self.stream = stream
        self.address = ""
        """Where /metrics is served (the real port), or empty."""
        self.notifier = sd_notify.Notifier.from_environment()
        self._runner: web.AppRunner | None = None
        self._supervision: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, stream: VDiskStream, export: NbdServer | None, metrics: Address | None
    ) -> Reporting:
        """Serve /metrics at ``metrics`` if given, and tell systemd we are ready. Raises
        OSError if it cannot listen there."""
        reporting = cls(stream)
        try:
            if metrics is not None:
                await reporting._serve(metrics, TargetCollector(stream, export))
        except BaseException:
            if reporting.notifier is not None:
                reporting.notifier.close()
            raise
        reporting._supervision = asyncio.create_task(
            sd_notify.supervise(reporting.notifier, reporting.status), name="sd_notify"
        )
        return reporting

    async def _serve(self, address: Address, collector: TargetCollector) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        app = web.Application()
        app.add_routes([web.get(PATH, make_aiohttp_handler(registry))])
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_host, bound_port = runner.addresses[0][:2]
        self.address = format_address(str(bound_host), int(bound_port))
        self._runner = runner
        log.info("metrics_listening", address=self.address, path=PATH)

    def status(self) -> tuple[bool, str]:
        """For systemd: ready from the start (the attach is done), and what it streams."""
        stream, session = self.stream, self.stream.session
        state = stream.core.state
        if state is failover_core.State.STREAMING and session is not None:
            return True, (
                f"streaming {stream.vdisk} from {session.server_name} at {session.connected_to}"
            )
        reason = stream.core.waiting_reason
        return True, f"{stream.vdisk}: {state.value}" + (f" ({reason})" if reason else "")

    async def close(self) -> None:
        sd_notify.stopping(self.notifier, f"detaching {self.stream.vdisk}")
        task, self._supervision = self._supervision, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif self.notifier is not None:
            self.notifier.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
