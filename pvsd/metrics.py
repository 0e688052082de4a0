"""Prometheus metrics at ``GET /metrics`` on the admin port.

Almost everything is read from the state pvsd keeps anyway (sessions, the catalog, the site
view, the replicator and the rebalancer), at scrape time, by one collector: serving pays
nothing for it. The exceptions are what only the session sees as it happens, kept in a
`RequestStats` per server with as little work as possible on the hot path:

- request latency, from a request's frame being whole to its reply being handed to the
  socket. A read answered from the page cache is only counted (one integer per request); its
  burst of requests is observed once, at the burst's duration, when the burst's replies are
  written together (so that figure is an upper bound for each of them): about 0.4 us per
  burst, against some 10 us of CPU per read. A request that went to a worker thread, or a
  rarer one answered on the loop (digests, a flush with nothing to write), is observed on
  its own.
- the bytes of sessions that ended (live sessions are read at scrape time);
- the requests of the network boot listener (`pvsd.boot_http`), by file and outcome.

Prometheus cannot sign requests, so ``/metrics`` is served without the admin signature when
the configuration's ``metrics`` is true (the default): read-only, and nothing in it is a
secret (no device ids, no target addresses, no keys). With ``metrics = false`` it is not
served at all. See docs/admin.md, "Metrics".
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

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

from pvs_protocol.modes import VersionState
from pvsd.replication import Holder, versions_report

if TYPE_CHECKING:
    from pvsd.admin import AdminServer
    from pvsd.server import StreamServer
    from pvsd.session import Session

PATH = "/metrics"
OPS = ("read", "write", "flush", "digests")
READ = OPS.index("read")
_OP_INDEX = {name: index for index, name in enumerate(OPS)}
LATENCY_BOUNDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Seconds. From reads answered from the page cache (tens of microseconds) through disk reads
(milliseconds) to a store that does not answer (``stall_timeout``, 5 s by default)."""
_BUCKET_LABELS = [f"{bound:g}" for bound in LATENCY_BOUNDS] + ["+Inf"]
REPLICA_STATUSES = ("identical", "different", "damaged", "pending")
STREAM_STATES = ("serving", "stopping", "stopped")
BOOT_FILES = ("chain", "script", "vmlinuz", "initrd", "other")
"""What a network boot request asked for: the chain script (no device yet), a device's
script, the kernel, the initramfs, or a path that is none of them."""
BOOT_OUTCOMES = ("ok", "refused", "not_found", "unavailable", "error")


class RequestStats:
    """What sessions of one server report as they answer: latency per operation, and the
    bytes of the sessions that ended. Only touched from the event loop."""

    __slots__ = ("buckets", "ended", "sums")

    def __init__(self) -> None:
        self.buckets = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in OPS]
        """Per operation, non-cumulative counts per bucket (the last one is +Inf)."""
        self.sums = [0.0] * len(OPS)
        self.ended: dict[tuple[str, int], list[int]] = {}
        """(vDisk, version) -> [bytes read, bytes written] by the sessions that ended."""

    def reads(self, seconds: float, count: int) -> None:
        """A burst of requests took ``seconds``; ``count`` reads were answered from the page
        cache during it, their replies written together at its end."""
        self.buckets[READ][bisect.bisect_left(LATENCY_BOUNDS, seconds)] += count
        self.sums[READ] += seconds * count

    def observe(self, what: str, seconds: float) -> None:
        """One request answered on its own (``what``: read, write, flush, digests)."""
        op = _OP_INDEX.get(what)
        if op is not None:
            self.buckets[op][bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
            self.sums[op] += seconds

    def take(self) -> tuple[list[list[int]], list[float]]:
        """The counts and sums since the last take, and start again from zero (a stream
        worker's, sent to pvsd: `pvsd.workers`)."""
        taken = self.buckets, self.sums
        self.buckets = [[0] * (len(LATENCY_BOUNDS) + 1) for _ in OPS]
        self.sums = [0.0] * len(OPS)
        return taken

    def add(self, buckets: object, sums: object) -> None:
        """Counts and sums a stream worker took; anything not shaped like them is ignored."""
        if not (isinstance(buckets, list) and isinstance(sums, list)
                and len(buckets) == len(OPS) == len(sums)):
            return
        for op, counts in enumerate(buckets):
            if isinstance(counts, list) and len(counts) == len(self.buckets[op]) \
                    and all(isinstance(c, int) and c >= 0 for c in counts) \
                    and isinstance(sums[op], int | float) and sums[op] >= 0:
                self.buckets[op] = [a + b for a, b in zip(self.buckets[op], counts, strict=True)]
                self.sums[op] += sums[op]

    def session_ended(self, session: Session) -> None:
        """Keep what an ending session moved: the bytes counters must never go down."""
        vdisk = session.vdisk
        if vdisk is None or not (session.bytes_read or session.bytes_written):
            return
        total = self.ended.setdefault((vdisk.name, vdisk.version), [0, 0])
        total[0] += session.bytes_read
        total[1] += session.bytes_written

    def histograms(self) -> Iterator[tuple[str, list[tuple[str, float]], float]]:
        """(operation, cumulative buckets, sum) as Prometheus wants them."""
        for op, name in enumerate(OPS):
            running = 0
            cumulative = []
            for label, count in zip(_BUCKET_LABELS, self.buckets[op], strict=True):
                running += count
                cumulative.append((label, float(running)))
            yield name, cumulative, self.sums[op]


class BootStats:
    """Requests of the network boot listener, counted as they are answered."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def answered(self, file: str, status: int) -> None:
        """One request for ``file`` (one of `BOOT_FILES`) answered with HTTP ``status``."""
        self.counts[file if file in BOOT_FILES else "other", boot_outcome(status)] += 1


def boot_outcome(status: int) -> str:
    """ok (the file or script, also in part or not modified), refused (a bad request),
    not_found (no such vDisk, version or file here), unavailable (nothing to boot now),
    error (pvsd's own fault)."""
    if status < 400:
        return "ok"
    if status == 404:
        return "not_found"
    if status < 500:
        return "refused"
    return "unavailable" if status == 503 else "error"


_REQUESTS: weakref.WeakKeyDictionary[StreamServer, RequestStats] = weakref.WeakKeyDictionary()
"""One per server, kept beside it rather than on it so that all of this bookkeeping is in
this module; weak, so that a server gone (in tests) takes its figures along."""


_BOOT: weakref.WeakKeyDictionary[StreamServer, BootStats] = weakref.WeakKeyDictionary()


def boot_requests_of(server: StreamServer) -> BootStats:
    """The server's BootStats (made on first use): its boot listener reports into it."""
    stats = _BOOT.get(server)
    if stats is None:
        stats = _BOOT[server] = BootStats()
    return stats


def requests_of(server: StreamServer) -> RequestStats:
    """The server's RequestStats (made on first use): its sessions report into it."""
    stats = _REQUESTS.get(server)
    if stats is None:
        stats = _REQUESTS[server] = RequestStats()
    return stats


class MetricsApi:
    """``GET /metrics``; registered by the AdminServer like its other sub-APIs."""

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PvsdCollector(admin))
        ProcessCollector(registry=self.registry)  # memory, open files, CPU of pvsd itself
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    @property
    def enabled(self) -> bool:
        return self.admin.config.metrics

    def routes(self) -> list[web.RouteDef]:
        if not self.enabled:
            return []
        scrape = make_aiohttp_handler(self.registry)
        server = self.admin.server

        async def handler(request: web.Request) -> web.StreamResponse:
            if server.workers is not None:  # their sessions' latest figures first
                await server.workers.refresh()
            return await scrape(request)

        return [web.get(PATH, handler)]

    def is_open(self, request: web.Request) -> bool:
        """Whether the request may skip the admin signature: a read of /metrics, with
        ``metrics`` on (Prometheus cannot sign)."""
        return request.method in ("GET", "HEAD") and request.path == PATH and self.enabled


class PvsdCollector(Collector):
    """Reads pvsd's state at scrape time (on the event loop, like everything it reads)."""

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin

    def collect(self) -> Iterable[Metric]:
        yield from self._server()
        yield from self._requests()
        yield from self._site()
        yield from self._replicas()
        yield from self._jobs()
        yield from self._admin()
        yield from self._boot()

    def _server(self) -> Iterator[Metric]:
        admin, server = self.admin, self.admin.server
        info = GaugeMetricFamily(
            "pvsd_info", "This server: its name and the pvs version it runs (always 1).",
            labels=["server", "version"],
        )
        info.add_metric([admin.config.name, _pvs_version()], 1)
        yield info
        state = GaugeMetricFamily(
            "pvsd_stream_state", "The stream service's state (1 for the current one).",
            labels=["state"],
        )
        for name in STREAM_STATES:
            state.add_metric([name], 1 if server.state.value == name else 0)
        yield state
        yield GaugeMetricFamily(
            "pvsd_connections", "Stream connections open, logged in or not.",
            value=len(server.sessions),
        )
        targets: Counter[tuple[str, int]] = Counter()
        for session in server.sessions:
            if session.streaming and session.vdisk is not None:
                targets[session.vdisk.name, session.vdisk.version] += 1
        family = GaugeMetricFamily(
            "pvsd_targets", "Targets streaming from this server, per vDisk version.",
            labels=["vdisk", "version"],
        )
        for vdisk, version in _keys(server.catalog.by_version(), targets):
            family.add_metric([vdisk, str(version)], targets[vdisk, version])
        yield family
        copies = GaugeMetricFamily(
            "pvsd_version_state", "This server's copies: the state of each vDisk version "
            "(1 for its state).", labels=["vdisk", "version", "state"],
        )
        for (vdisk, version), copy in sorted(server.catalog.by_version().items()):
            for version_state in VersionState:
                copies.add_metric(
                    [vdisk, str(version), str(version_state)],
                    1 if copy.state is version_state else 0,
                )
        yield copies
        yield GaugeMetricFamily(
            "pvsd_stores_stalled", "Stores whose requests have not completed for "
            "stall_timeout (their copies are not served).",
            value=sum(1 for path in server.catalog_paths if server.store_stalled(path)),
        )
        relogins = CounterMetricFamily(
            "pvsd_relogins_sent", "RELOGIN notices sent to targets (move to another server), "
            "by why.", labels=["reason"],
        )
        sent: Counter[str] = Counter({"stop_stream": 0, "store_stalled": 0})
        sent.update(getattr(server, "relogins_sent", None) or {})
        rebalancer = admin.rebalance.rebalancer
        sent["rebalancing"] = rebalancer.moved if rebalancer is not None else 0
        for reason, count in sorted(sent.items()):
            relogins.add_metric([reason], count)
        yield relogins
        yield CounterMetricFamily(
            "pvsd_rebalance_runs", "Rebalancing decisions carried out (not dry runs).",
            value=rebalancer.runs if rebalancer is not None else 0,
        )

    def _requests(self) -> Iterator[Metric]:
        server = self.admin.server
        stats = requests_of(server)
        latency = HistogramMetricFamily(
            "pvsd_request_duration_seconds", "Requests from targets, from the request being "
            "received whole to its reply handed to the socket; _count is the requests "
            "answered (refusals and errors are not counted).", labels=["op"],
        )
        for op, buckets, seconds in stats.histograms():
            latency.add_metric([op], buckets, seconds)
        yield latency
        moved: dict[tuple[str, int], list[int]] = {
            key: list(value) for key, value in stats.ended.items()
        }
        for key in server.catalog.by_version():  # present from the start, at 0
            moved.setdefault(key, [0, 0])
        for session in server.sessions:
            if session.vdisk is not None:
                key = session.vdisk.name, session.vdisk.version
                total = moved.setdefault(key, [0, 0])
                total[0] += session.bytes_read
                total[1] += session.bytes_written
        read = CounterMetricFamily(
            "pvsd_read_bytes", "Bytes of vDisk data sent to targets.", labels=["vdisk", "version"]
        )
        written = CounterMetricFamily(
            "pvsd_written_bytes", "Bytes written by targets (Private Images).",
            labels=["vdisk", "version"],
        )
        for (name, version), (sent, received) in sorted(moved.items()):
            read.add_metric([name, str(version)], sent)
            written.add_metric([name, str(version)], received)
        yield read
        yield written

    def _site(self) -> Iterator[Metric]:
        admin, server = self.admin, self.admin.server
        site = server.site
        per_server = GaugeMetricFamily(
            "pvsd_site_targets", "Targets streaming from each server of the site, as this "
            "server sees it (its own count and its peers' last heartbeats).", labels=["server"],
        )
        per_server.add_metric([admin.config.name], server.local_state().targets)
        up = GaugeMetricFamily(
            "pvsd_peer_up", "1 while a peer is heard from (within peer_timeout).",
            labels=["peer"],
        )
        heard = GaugeMetricFamily(
            "pvsd_peer_last_heard_seconds", "Seconds since a peer was last heard from.",
            labels=["peer"],
        )
        now = time.monotonic()
        peers = sorted(site.peers.values(), key=lambda p: p.name) if site is not None else []
        for peer in peers:
            per_server.add_metric([peer.name], peer.heartbeat.targets if peer.up else 0)
            up.add_metric([peer.name], 1 if peer.up else 0)
            heard.add_metric([peer.name], max(0.0, now - peer.last_heard))
        yield per_server
        yield up
        yield heard
        yield GaugeMetricFamily(
            "pvsd_peers_configured", "Peers in this server's configuration.",
            value=len(admin.config.peers),
        )
        yield GaugeMetricFamily(
            "pvsd_peers_up", "Peers heard from within peer_timeout.",
            value=sum(1 for peer in peers if peer.up),
        )
        yield CounterMetricFamily(
            "pvsd_coordination_received", "Coordination messages accepted from peers.",
            value=site.received if site is not None else 0,
        )
        dropped = CounterMetricFamily(
            "pvsd_coordination_dropped", "Coordination messages dropped, by reason (bad_mac: "
            "another site key; replayed or stale: a copy or a clock; own: a server with our "
            "name).", labels=["reason"],
        )
        for reason, count in sorted((site.dropped if site is not None else {}).items()):
            dropped.add_metric([reason], count)
        yield dropped

    def _replicas(self) -> Iterator[Metric]:
        holders = self.admin.holders()
        by_vdisk: dict[str, list[Holder]] = {}
        for holder in holders:
            by_vdisk.setdefault(holder.entry.vdisk, []).append(holder)
        copies = GaugeMetricFamily(
            "pvsd_replicas", "Copies of each vDisk version in the site by status, as this "
            "server sees the site (identical: the version's reference manifest; different; "
            "damaged; pending: being checked).", labels=["vdisk", "version", "status"],
        )
        pending = GaugeMetricFamily(
            "pvsd_version_pending", "1 for a production version held back because a serving "
            "server lacks it (pvsctl vdisk versions).", labels=["vdisk", "version"],
        )
        for name, group in sorted(by_vdisk.items()):
            for row in versions_report(group):
                version = str(row["version"])
                counts = Counter(copy["status"] for copy in row["copies"].values())
                for status in REPLICA_STATUSES:
                    copies.add_metric([name, version, status], counts[status])
                pending.add_metric([name, version], 1 if row["pending"] else 0)
        yield copies
        yield pending

    def _jobs(self) -> Iterator[Metric]:
        replicator = self.admin.replication.replicator
        jobs = GaugeMetricFamily(
            "pvsd_replications", "Copies from other servers to this one, by state (running, "
            "and the most recent finished ones).", labels=["state"],
        )
        remaining = GaugeMetricFamily(
            "pvsd_replication_remaining_bytes", "Bytes a running copy still has to fetch.",
            labels=["vdisk", "version"],
        )
        states: Counter[str] = Counter({"copying": 0, "done": 0, "failed": 0})
        if replicator is not None:
            for job in [*replicator.jobs.values(), *replicator.finished]:
                states[str(job.state)] += 1
            for (vdisk, version), job in sorted(replicator.jobs.items()):
                remaining.add_metric([vdisk, str(version)], job.meter.remaining)
        for state, count in sorted(states.items()):
            jobs.add_metric([state], count)
        yield jobs
        yield remaining

    def _admin(self) -> Iterator[Metric]:
        admin = self.admin
        yield CounterMetricFamily(
            "pvsd_admin_requests", "Admin API requests accepted (signed).", value=admin.requests
        )
        yield CounterMetricFamily(
            "pvsd_admin_bad_requests", "Admin API requests refused with a 4xx other than 401.",
            value=admin.bad_requests,
        )
        failures = CounterMetricFamily(
            "pvsd_admin_auth_failures", "Admin API requests refused as not authenticated, by "
            "reason.", labels=["reason"],
        )
        for reason, count in sorted(admin.auth_failures.items()):
            failures.add_metric([reason], count)
        yield failures

    def _boot(self) -> Iterator[Metric]:
        if not self.admin.config.boot_host:
            return
        counts = boot_requests_of(self.admin.server).counts
        family = CounterMetricFamily(
            "pvsd_boot_requests", "Requests to the network boot listener, by what was asked "
            "for (chain, script, vmlinuz, initrd, other) and outcome (ok, refused, not_found, "
            "unavailable, error).", labels=["file", "outcome"],
        )
        for file in BOOT_FILES:
            for outcome in BOOT_OUTCOMES:
                family.add_metric([file, outcome], counts[file, outcome])
        yield family


def _keys(*sources: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted({key for source in sources for key in source})


def _pvs_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("pvs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
