"""Prometheus metrics and systemd readiness, against a real two-server site.

s1 starts first; s2 starts with a NOTIFY_SOCKET of the test's (a unix datagram socket, as
systemd's) and a watchdog, so its READY=1 must wait until it has heard s1. Every metric is
scraped unsigned, as Prometheus does, and must move when targets log in, read and leave.
``pvs-target attach --metrics`` is scraped the same way, through a planned failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import PYTHON, Pvsd, free_port, logged_in
from prometheus_client.parser import text_string_to_metric_families
from sites import Site, keygen

from pvs_target.client import read_range
from pvs_target.failover import VDiskStream
from pvs_target.nbd import wire as nbd
from pvs_target.nbd.client import NbdClient
from pvsd.config import read_key
from pvsd.console import UserError
from pvsd.console.client import AdminClient

MIB = 1 << 20
WATCHDOG_USEC = 400_000
"""s2's watchdog: a ping every 0.2 s."""
PVSD_FAMILIES = {
    "pvsd_info", "pvsd_stream_state", "pvsd_connections", "pvsd_targets", "pvsd_version_state",
    "pvsd_stores_stalled", "pvsd_relogins_sent", "pvsd_rebalance_runs",
    "pvsd_request_duration_seconds", "pvsd_read_bytes", "pvsd_written_bytes",
    "pvsd_site_targets", "pvsd_peer_up", "pvsd_peer_last_heard_seconds",
    "pvsd_peers_configured", "pvsd_peers_up", "pvsd_coordination_received",
    "pvsd_coordination_dropped", "pvsd_replicas", "pvsd_version_pending", "pvsd_replications",
    "pvsd_replication_remaining_bytes", "pvsd_admin_requests", "pvsd_admin_bad_requests",
    "pvsd_admin_auth_failures", "process_resident_memory_bytes", "process_open_fds",
}
TARGET_FAMILIES = {
    "pvs_target_info", "pvs_target_state", "pvs_target_server", "pvs_target_in_flight",
    "pvs_target_requests", "pvs_target_read_bytes", "pvs_target_written_bytes",
    "pvs_target_retried_requests", "pvs_target_longest_wait_seconds", "pvs_target_failovers",
    "pvs_target_failover_duration_seconds", "pvs_target_verified_blocks",
    "pvs_target_nbd_connections", "pvs_target_write_cache_used_bytes",
    "pvs_target_write_cache_limit_bytes", "process_resident_memory_bytes",
}


class Metrics:
    """One scrape: every sample by name, with its labels."""

    def __init__(self, text: str) -> None:
        self.families = set()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def __call__(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels``."""
        return sum(
            value for have, value in self.samples.get(name, [])
            if all(have.get(key) == wanted for key, wanted in labels.items())
        )

    def labels(self, name: str, label: str) -> set[str]:
        return {have[label] for have, value in self.samples.get(name, []) if value}


def scrape(address: str) -> Metrics:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return Metrics(answer.read().decode())


def status_of(address: str, path: str, method: str = "GET") -> int:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


class NotifySocket:
    """The service manager's end of sd_notify: a unix datagram socket, read all the time by a
    thread of its own (as systemd reads its socket: a queue left unread fills after a few
    datagrams); every message kept."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pvs-notify-")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket")
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.messages.append(message)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def wait_for(
        self, condition: Callable[[list[dict[str, str]]], object], timeout: float, what: str
    ) -> None:
        """Until ``condition(messages)`` is true (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.snapshot()
            if condition(messages):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:g} s; got {messages}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        self.socket.close()
        os.unlink(self.path)
        os.rmdir(self.directory)


def said(name: str, value: str = "1") -> Callable[[list[dict[str, str]]], bool]:
    return lambda messages: any(m.get(name) == value for m in messages)


class Running:
    def __init__(self, site: Site, notify: NotifySocket) -> None:
        self.site = site
        self.notify = notify
        self.s1, self.s2 = site.servers
        self.key = read_key(site.key)

    def admin(self, server: Any) -> str:
        return f"{server.host}:{server.port + 1}"

    def client(self, server: Any) -> AdminClient:
        return AdminClient(self.admin(server), self.key)

    def by_name(self, name: str) -> Any:
        return self.site.by_name(name)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    built = Site(tmp_path_factory.mktemp("metrics-site"), count=2)
    notify = NotifySocket()
    try:
        first, second = built.servers
        first.start(vdisks=["disk"])
        with pytest.MonkeyPatch.context() as environment:
            environment.setenv("NOTIFY_SOCKET", notify.path)
            environment.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
            second.start(vdisks=["disk"])
        for server, other in ((first, second), (second, first)):
            server.wait_for_log("peer_inventory", peer=other.name)
        yield Running(built, notify)
    finally:
        built.stop()
        notify.close()


def test_pvsd_is_ready_once_it_has_joined_the_site_and_its_loop_pings(site: Running) -> None:
    site.notify.wait_for(said("READY"), 15, "READY=1")
    ready = next(m for m in site.notify.snapshot() if m.get("READY") == "1")
    assert ready["STATUS"] == "serving 0 target(s); 1 of 1 peer(s) up", ready
    events = [line.get("event") for line in site.s2.log_lines()]
    heard = next(i for i, line in enumerate(site.s2.log_lines())
                 if line.get("event") == "peer_inventory" and line.get("peer") == "s1")
    assert heard < events.index("sd_notify_ready"), "READY=1 came before s1 was heard"
    pings = sum(1 for m in site.notify.snapshot() if m.get("WATCHDOG") == "1")
    site.notify.wait_for(
        lambda messages: sum(1 for m in messages if m.get("WATCHDOG") == "1") >= pings + 3,
        30, "three more WATCHDOG=1 (one every 0.2 s)",
    )


def test_metrics_are_served_unsigned_and_nothing_else_is(site: Running) -> None:
    admin = site.admin(site.s1)
    metrics = scrape(admin)
    missing = PVSD_FAMILIES - metrics.families
    assert not missing, f"not in /metrics: {sorted(missing)}"
    assert status_of(admin, "/v1/servers") == 401
    assert status_of(admin, "/metrics", method="POST") == 401
    assert metrics("pvsd_info", server="s1") == 1
    assert metrics("pvsd_stream_state", state="serving") == 1
    assert metrics("pvsd_peers_configured") == 1
    assert metrics("pvsd_peer_up", peer="s2") == 1
    assert metrics("pvsd_replicas", vdisk="disk", status="identical") == 2
    assert metrics("pvsd_replicas", vdisk="disk", status="damaged") == 0
    assert metrics("pvsd_version_state", vdisk="disk", state="production") == 1
    assert {labels["reason"] for labels, _ in metrics.samples["pvsd_relogins_sent_total"]} == {
        "rebalancing", "stop_stream", "store_stalled",
    }


def test_metrics_off_serves_nothing_and_asks_for_a_signature(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_text(keygen())
    store = tmp_path / "store"
    store.mkdir()
    server = Pvsd("quiet", store, tmp_path)
    admin = f"{server.host}:{server.port + 1}"
    server.args = ["--key-file", str(key), "--admin", admin, "--metrics", "off"]
    with server:
        server.wait_for_log("admin_listening")
        assert status_of(admin, "/metrics") == 401
        with pytest.raises(UserError, match="HTTP 404"):
            AdminClient(admin, read_key(key)).get("/metrics")


def test_coordination_drops_and_admin_requests_are_counted(site: Running) -> None:
    admin = site.admin(site.s1)
    before = scrape(admin)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"not a coordination message", (site.s1.host, site.s1.port))
    assert status_of(admin, "/v1/site") == 401
    site.client(site.s1).get("/v1/servers")
    deadline = time.monotonic() + 10
    while True:
        after = scrape(admin)
        if after("pvsd_coordination_dropped_total") > before(
            "pvsd_coordination_dropped_total"
        ) and after("pvsd_coordination_received_total") > before(
            "pvsd_coordination_received_total"  # s2's heartbeats
        ):
            break
        assert time.monotonic() < deadline, "the junk datagram (or s2) was not counted"
        time.sleep(0.1)
    assert after("pvsd_admin_requests_total") >= before("pvsd_admin_requests_total") + 1
    assert after("pvsd_admin_auth_failures_total", reason="missing") >= (
        before("pvsd_admin_auth_failures_total", reason="missing") + 1
    )


async def test_targets_bytes_and_latency_move_with_load(site: Running) -> None:
    admins = [site.admin(server) for server in (site.s1, site.s2)]

    async def both() -> list[Metrics]:
        return [await asyncio.to_thread(scrape, admin) for admin in admins]

    before = await both()
    addresses = [site.s1.address, site.s2.address]
    async with logged_in(addresses, "disk", "metrics-a") as first, \
            logged_in(addresses, "disk", "metrics-b") as second:
        for session in (first, second):
            data = await read_range(session, 0, 2 * MIB, chunk=256 * 1024)
            assert data is not None and len(data) == 2 * MIB
        during = await both()
        assert sum(m("pvsd_targets", vdisk="disk") for m in during) == 2
        assert sum(m("pvsd_connections") for m in during) >= 2
        for metrics in during:  # each server counts its own and sees its peer's heartbeat
            own = metrics("pvsd_targets")
            assert metrics("pvsd_site_targets", server=metrics.labels(
                "pvsd_info", "server").pop()) == own
    grew = [
        (after("pvsd_read_bytes_total", vdisk="disk") - earlier("pvsd_read_bytes_total"),
         after("pvsd_request_duration_seconds_count", op="read")
         - earlier("pvsd_request_duration_seconds_count", op="read"))
        for earlier, after in zip(before, during, strict=True)
    ]
    assert sum(read for read, _ in grew) >= 4 * MIB
    assert sum(requests for _, requests in grew) >= 16  # 4 MiB in 256 KiB reads
    for metrics in during:
        count = metrics("pvsd_request_duration_seconds_count", op="read")
        assert metrics("pvsd_request_duration_seconds_bucket", op="read", le="+Inf") == count
        assert metrics("pvsd_request_duration_seconds_sum", op="read") > 0 or count == 0

    async def all_left() -> list[Metrics]:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            now = await both()
            if sum(m("pvsd_targets") for m in now) == 0:
                return now
            assert asyncio.get_running_loop().time() < deadline, "targets still counted"
            await asyncio.sleep(0.1)

    after = await all_left()
    for earlier, later in zip(during, after, strict=True):  # counters keep what ended sessions did
        assert later("pvsd_read_bytes_total") >= earlier("pvsd_read_bytes_total")


async def test_stop_stream_relogins_are_counted(site: Running) -> None:
    stream = VDiskStream([site.s1.address, site.s2.address], "disk", "metrics-relogin")
    await stream.open()
    try:
        session = stream.session
        assert session is not None
        server = site.by_name(session.server_name)
        before = await asyncio.to_thread(scrape, site.admin(server))
        await asyncio.to_thread(
            site.client(server).post, f"/v1/servers/{server.name}/stop-stream", {}
        )
        after = await asyncio.to_thread(scrape, site.admin(server))
        await asyncio.to_thread(
            site.client(server).post, f"/v1/servers/{server.name}/start-stream", {}
        )
    finally:
        await stream.close()
    assert after("pvsd_relogins_sent_total", reason="stop_stream") == (
        before("pvsd_relogins_sent_total", reason="stop_stream") + 1
    )


# -- pvs-target attach --metrics ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def attach(site: Running, workdir: Path, notify: NotifySocket) -> AsyncIterator[str]:
    """``pvs-target attach --metrics`` with an NBD export and a RAM write cache of 64 MiB,
    under a NOTIFY_SOCKET of the test's; yields the metrics address."""
    address = f"127.0.0.1:{free_port('127.0.0.1', span=1)}"
    command = [
        PYTHON, "-m", "pvs_target", "attach", "--vdisk", "disk", "--device-id", "metrics-nbd",
        "--server", site.s1.address, "--server", site.s2.address,
        "--nbd", f"unix:{workdir / 'nbd.sock'}", "--control", str(workdir / "control.sock"),
        "--cache", "ram", "--cache-size", "64M", "--metrics", address,
    ]
    environment = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
    with (workdir / "attach.stderr").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            env=environment,
        )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        assert line, f"attach exited: {(workdir / 'attach.stderr').read_text()}"
        assert json.loads(line)["event"] == "attached"
        yield address
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # our own child, by its pid
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def scraped(address: str, condition: Callable[[Metrics], bool], what: str) -> Metrics:
    """Scrape until ``condition`` holds (bounded)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        metrics = await asyncio.to_thread(scrape, address)
        if condition(metrics):
            return metrics
        assert asyncio.get_running_loop().time() < deadline, f"metrics never showed {what}"
        await asyncio.sleep(0.1)


async def nbd_write(client: NbdClient, offset: int, data: bytes) -> None:
    """A WRITE through the test client (it only reads): its reply carries no data, so it is
    registered with a length of 0 for the client's reply reader."""
    future: asyncio.Future[tuple[int, bytes, float]] = asyncio.get_running_loop().create_future()
    handle = 1 << 40
    client._waiting[handle] = (future, 0)
    client.writer.write(nbd.REQUEST.pack(
        nbd.REQUEST_MAGIC, 0, nbd.CommandKind.WRITE, handle, offset, len(data)
    ) + data)
    error, _, _ = await future
    assert error == 0


async def test_pvs_target_metrics_move_with_load_and_failover(
    site: Running, tmp_path: Path
) -> None:
    notify = NotifySocket()
    try:
        async with attach(site, tmp_path, notify) as address:
            await asyncio.to_thread(notify.wait_for, said("READY"), 10, "READY=1")
            ready = next(m for m in notify.snapshot() if m.get("READY") == "1")
            assert ready["STATUS"].startswith("streaming disk from s"), ready
            first = await asyncio.to_thread(scrape, address)
            missing = TARGET_FAMILIES - first.families
            assert not missing, f"not in pvs-target's /metrics: {sorted(missing)}"
            assert first("pvs_target_state", state="streaming") == 1
            streaming_from = first.labels("pvs_target_server", "server")
            assert len(streaming_from) == 1
            assert first("pvs_target_write_cache_limit_bytes") == 64 * MIB
            assert first("pvs_target_write_cache_used_bytes") == 0
            client = await NbdClient.connect(tmp_path / "nbd.sock")
            try:
                for offset in range(0, MIB, 256 * 1024):
                    await client.read(offset, 256 * 1024)
                await nbd_write(client, 0, b"\xab" * 65536)
                loaded = await asyncio.to_thread(scrape, address)
                assert loaded("pvs_target_nbd_connections") == 1
            finally:
                await client.close()
            read = loaded("pvs_target_read_bytes_total") - first("pvs_target_read_bytes_total")
            assert read >= MIB
            assert loaded("pvs_target_requests_total") >= first("pvs_target_requests_total") + 4
            assert loaded("pvs_target_write_cache_used_bytes") >= 65536
            assert loaded("pvs_target_verified_blocks_total") > first(
                "pvs_target_verified_blocks_total"
            )
            server = site.by_name(streaming_from.pop())
            await asyncio.to_thread(
                site.client(server).post, f"/v1/servers/{server.name}/stop-stream", {}
            )
            try:
                moved = await scraped(
                    address, lambda m: m("pvs_target_failovers_total", kind="planned") >= 1,
                    "a planned failover",
                )
                assert moved("pvs_target_failovers_total", kind="planned") == 1
                assert moved("pvs_target_failovers_total", kind="unplanned") == 0
                assert moved("pvs_target_failover_duration_seconds_count") == 1
                assert moved.labels("pvs_target_server", "server") == {
                    s.name for s in (site.s1, site.s2) if s is not server
                }
            finally:
                await asyncio.to_thread(
                    site.client(server).post, f"/v1/servers/{server.name}/start-stream", {}
                )
        await asyncio.to_thread(notify.wait_for, said("STOPPING"), 10, "STOPPING=1")
        assert any(m.get("WATCHDOG") == "1" for m in notify.snapshot())
    finally:
        notify.close()


def test_a_taken_metrics_port_is_one_clear_line(site: Running, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "pvs_target", "attach", "--vdisk", "disk", "--server", site.s1.address,
             "--control", str(tmp_path / "control.sock"), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pvs-target: error: --metrics 127.0.0.1:{port}")
    assert "in use" in lines[0], lines[0]


def test_pvsd_says_stopping_at_shutdown(site: Running) -> None:
    """Last: it stops s2."""
    site.s2.signal(signal.SIGTERM)
    site.notify.wait_for(said("STOPPING"), 15, "STOPPING=1")
    assert site.s2.wait() == 0
