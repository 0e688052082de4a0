"""The admin API and pvsctl against a real site: three pvsd processes on 127.0.0.11-13.

One site serves the whole module (starting it is most of the cost); each test uses its own
vDisk so that the order of the tests does not matter: ``gold`` (replication status: damaged,
then another version on one server), ``base`` (targets), ``tools`` (settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from harness import Pvsd, free_port, logged_in, random_bytes

from pvsd.admin_auth import sign
from pvsd.config import read_key
from pvsd.console import UserError
from pvsd.console.client import AdminClient
from pvsd.properties import load_properties, properties_path

MIB = 1024 * 1024
HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
POWERS = (1.0, 2.0, 0.5)
VDISKS = ("base", "gold", "tools")


@dataclass
class Site:
    servers: list[Pvsd]
    admin: list[str]
    stores: list[Path]
    key_file: Path
    key: bytes

    def client(self, index: int = 0) -> AdminClient:
        return AdminClient(self.admin[index], self.key)

    def pvsctl(self, *args: str, index: int = 0) -> subprocess.CompletedProcess[str]:
        """pvsctl with --admin of server ``index`` and the site key."""
        return pvsctl("--admin", self.admin[index], "--key-file", str(self.key_file), *args)


def pvsctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    for name in ("PVS_ADMIN", "PVS_KEY_FILE"):
        if env is None or name not in env:
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", *args], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=environment, check=False,
    )


def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns something true; return that (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.1)


def vdisk(answer: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in answer["vdisks"] if item["name"] == name)


def statuses(entry: dict[str, Any]) -> dict[str, str]:
    return {replica["server"]: replica["status"] for replica in entry["replicas"]}


def all_up(site: Site, index: int) -> bool:
    servers = site.client(index).get("/v1/servers")["servers"]
    return len(servers) == 3 and all(s["up"] and s["state"] == "serving" for s in servers)


def converged(site: Site, index: int) -> bool:
    """Server ``index`` sees all three servers up, each with an identical copy of each vDisk."""
    answer = site.client(index).get("/v1/vdisks")
    servers = site.client(index).get("/v1/servers")["servers"]
    return len(servers) == 3 and all(s["up"] for s in servers) and all(
        any(v["name"] == name for v in answer["vdisks"])
        and statuses(vdisk(answer, name)) == dict.fromkeys(("s1", "s2", "s3"), "identical")
        for name in VDISKS
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("admin-site")
    keygen = pvsctl("site", "keygen")
    assert keygen.returncode == 0, keygen.stderr
    assert len(keygen.stdout.strip()) == 64 and "chmod 600" in keygen.stderr
    key_file = root / "site.key"
    key_file.write_text(keygen.stdout)
    key_file.chmod(0o600)
    stores = [root / f"store{index}" for index in (1, 2, 3)]
    for store in stores:
        store.mkdir()
    for seed, name in enumerate(VDISKS):
        (stores[0] / f"{name}.img").write_bytes(random_bytes(MIB, seed))
        for store in stores[1:]:  # as an administrator replicates: cp -p keeps the mtime
            subprocess.run(
                ["cp", "-p", str(stores[0] / f"{name}.img"), str(store)], check=True
            )
    ports = [free_port(host, span=2) for host in HOSTS]
    streams = [f"{host}:{port}" for host, port in zip(HOSTS, ports, strict=True)]
    admin = [f"{host}:{port + 1}" for host, port in zip(HOSTS, ports, strict=True)]
    servers = []
    for index, host in enumerate(HOSTS):
        peers = [arg for other in streams if other != streams[index] for arg in ("--peer", other)]
        args = [
            "--key-file", str(key_file), *peers, "--admin", admin[index],
            "--power", str(POWERS[index]), "--watch-interval", "0.2",
            "--heartbeat-interval", "0.2",
        ]
        servers.append(
            Pvsd(f"s{index + 1}", stores[index], root, host=host, port=ports[index], args=args)
        )
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.kill)
            stack.callback(server.stop)
        for server in servers:
            server.start()
        for server in servers:
            server.wait_for_log("admin_listening", address=admin[servers.index(server)])
        result = Site(servers, admin, stores, key_file, read_key(key_file))
        for index in range(3):
            until(partial(converged, result, index), 15, f"s{index + 1} to see the whole site")
        yield result
        for server in servers:
            assert server.alive(), server.log_tail()
            assert not server.trouble(), f"{server.name}: {server.trouble()}"


def raw_request(
    address: str, method: str, path: str, body: bytes = b"", header: str | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://{address}{path}", data=body or None, method=method)
    if header is not None:
        request.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def signed(site: Site, index: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    header = sign(
        site.key, method, path, raw, time.time_ns() // 1_000_000, target=site.admin[index]
    )
    return raw_request(site.admin[index], method, path, raw, header)


# -- servers ---------------------------------------------------------------------------------


def test_every_server_lists_the_whole_site(site: Site) -> None:
    for index in range(3):
        servers = site.client(index).get("/v1/servers")["servers"]
        by_name = {server["name"]: server for server in servers}
        assert sorted(by_name) == ["s1", "s2", "s3"]
        for number, server in enumerate(site.servers):
            entry = by_name[server.name]
            assert entry["up"] and entry["state"] == "serving", entry
            assert entry["power"] == POWERS[number]
            assert entry["stream_address"] == server.address
            assert entry["admin_address"] == site.admin[number]
            assert entry["self"] == (number == index)
            assert entry["vdisks"] == len(VDISKS)
            assert entry["last_heard_seconds"] < 3
    site_counters = site.client(1).get("/v1/site")
    assert site_counters["name"] == "s2" and site_counters["coordination"]["received"] > 0
    assert site_counters["coordination"]["peers_up"] == 2


# -- replication -----------------------------------------------------------------------------


def test_copies_are_identical_until_one_is_damaged_then_another_version(site: Site) -> None:
    gold = vdisk(site.client(2).get("/v1/vdisks"), "gold")
    assert statuses(gold) == {"s1": "identical", "s2": "identical", "s3": "identical"}
    assert sorted(gold["failover_candidates"]) == ["s1", "s2", "s3"]
    assert gold["high_availability"] and gold["settings"]["mode"] == "standard"
    assert gold["damaged"] == []
    reference = gold["reference"]
    assert all(replica["identity"] == reference for replica in gold["replicas"])
    assert all(isinstance(replica["scrub"], dict) for replica in gold["replicas"]), gold

    offset = 20000  # in the second 16 KiB block
    image = site.stores[2] / "gold.img"
    with image.open("r+b") as file:
        file.seek(offset)
        file.write(b"changed on s3 only")

    def s3_damaged() -> dict[str, Any] | None:
        entry = vdisk(site.client(0).get("/v1/vdisks"), "gold")
        s3 = next(r for r in entry["replicas"] if r["server"] == "s3")
        return entry if s3["status"] == "damaged" and s3["damage"]["found_by"] else None

    gold = until(s3_damaged, 15, "s3 to find its copy of gold damaged")
    s3 = next(r for r in gold["replicas"] if r["server"] == "s3")
    block_size = reference["block_size"]
    assert s3["damage"]["first_offset"] == offset // block_size * block_size, s3
    assert s3["damage"]["bad_blocks"] >= 1 and s3["damage"]["since"], s3
    assert s3["identity"] == reference, "a damaged copy still shows which manifest it has"
    assert gold["reference"] == reference and gold["damaged"] == ["s3"]
    assert sorted(gold["failover_candidates"]) == ["s1", "s2"]
    table = site.pvsctl("vdisks")
    assert table.returncode == 0, table.stderr
    assert f"DAMAGED at offset {s3['damage']['first_offset']}" in table.stdout, table.stdout

    # The change was meant: make it version 2 on s3. Its manifest is now the newest version
    # and the reference; the two untouched copies are the old version, not damaged.
    made = pvsctl("vdisk", "manifest", "gold", "--store", str(site.stores[2]), "--version", "2")
    assert made.returncode == 0, made.stderr

    def s3_is_the_reference() -> dict[str, Any] | None:
        entry = vdisk(site.client(1).get("/v1/vdisks"), "gold")
        return entry if statuses(entry) == {
            "s1": "different", "s2": "different", "s3": "identical",
        } else None

    gold = until(s3_is_the_reference, 15, "s3's version 2 of gold to become the reference")
    assert gold["reference"]["version"] == 2 and gold["failover_candidates"] == ["s3"]
    s1 = next(r for r in gold["replicas"] if r["server"] == "s1")
    assert s1["differences"] == ["version", "timestamp"], s1
    assert s1["version_status"] == "identical", "a good copy of version 1, not a fault"
    table = site.pvsctl("vdisks", index=1)
    assert "version 1 (production)" in table.stdout, table.stdout


# -- targets ---------------------------------------------------------------------------------


async def test_targets_lists_a_target_with_its_server(site: Site) -> None:
    async with logged_in(site.servers[0].address, "base", "it-admin-target") as session:
        serving = next(s for s in site.servers if s.name == session.server_name)
        answer = await asyncio.to_thread(site.client(2).get, "/v1/targets")
        assert answer["errors"] == []
        (target,) = [t for t in answer["targets"] if t["device_id"] == "it-admin-target"]
        assert target["vdisk"] == "base" and target["server"] == serving.name
        assert target["server_address"] == serving.address
        assert target["server_ip"] == serving.host
        assert target["session"] == f"{session.session_id:016x}"
        assert target["target_ip"].startswith("127.") and target["seconds"] >= 0
        local = await asyncio.to_thread(
            site.client(site.servers.index(serving)).get, "/v1/local/targets"
        )
        assert [t["device_id"] for t in local["targets"]] == ["it-admin-target"]
        table = await asyncio.to_thread(site.pvsctl, "targets", index=1)
        assert table.returncode == 0, table.stderr
        assert "it-admin-target" in table.stdout and serving.address in table.stdout
    answer = await asyncio.to_thread(site.client(1).get, "/v1/targets")
    assert not [t for t in answer["targets"] if t["device_id"] == "it-admin-target"]


def test_a_silent_server_costs_one_error_entry_not_the_request(site: Site) -> None:
    site.servers[2].freeze()
    try:
        started = time.monotonic()
        result = site.pvsctl("targets", index=0)
        elapsed = time.monotonic() - started
    finally:
        site.servers[2].thaw()
    assert result.returncode == 0, result.stderr
    assert "targets of s3 are missing" in result.stderr, result.stderr
    assert "did not answer within 2 s" in result.stderr or "s3 is down" in result.stderr
    assert elapsed < 5
    for index in range(3):
        until(partial(all_up, site, index), 10, f"s{index + 1} to see s3 again")


# -- settings --------------------------------------------------------------------------------


def test_vdisk_set_through_the_api_changes_every_server(site: Site) -> None:
    changes = {
        "description": "set through the API", "load_balancing": False, "fixed_server": "s3",
        "subnet_affinity": "best_effort",
    }
    status, answer = signed(site, 1, "POST", "/v1/vdisks/tools/settings", changes)
    assert status == 200 and answer["ok"], answer
    assert sorted(r["server"] for r in answer["results"]) == ["s1", "s2", "s3"]
    assert all(r["held"] and r["changed"] for r in answer["results"]), answer
    for store in site.stores:
        properties = load_properties(properties_path(store / "tools.img"))
        assert properties.description == "set through the API"
        assert (properties.load_balancing, properties.fixed_server) == (False, "s3")
        assert str(properties.subnet_affinity) == "best_effort"

    def everywhere() -> bool:
        result = site.pvsctl("vdisks", "--json", index=2)
        assert result.returncode == 0, result.stderr
        tools = vdisk(json.loads(result.stdout), "tools")
        return all(
            r["settings"]["fixed_server"] == "s3" and not r["settings"]["load_balancing"]
            and r["status"] == "identical" for r in tools["replicas"]
        )

    until(everywhere, 10, "every server to report the new settings of tools")

    result = site.pvsctl("vdisk", "set", "tools", "--version", "2", index=0)
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert [line.split(";")[0] for line in lines] == ["s1: saved", "s2: saved", "s3: saved"]
    roots = {line.rsplit("root ", 1)[-1] for line in lines}
    assert len(roots) == 1, f"one new manifest on every server, not one each: {lines}"

    def version_2() -> bool:
        tools = vdisk(site.client(1).get("/v1/vdisks"), "tools")
        return tools["reference"]["version"] == 2 and set(statuses(tools).values()) == {
            "identical"
        }

    until(version_2, 10, "version 2 of tools on every server")


@pytest.mark.parametrize(
    ("path", "body", "status", "said"),
    [
        ("/v1/vdisks/base/settings", {"load_balancing": False}, 400, "fixed_server"),
        ("/v1/vdisks/base/settings", {"maintenance": "yes"}, 400, "true or false"),
        ("/v1/vdisks/base/settings", {"colour": "blue"}, 400, "unknown setting"),
        ("/v1/vdisks/base/settings", {"fixed_server": "s9"}, 400, "not a server of this site"),
        ("/v1/vdisks/base/settings", b"{not json", 400, "not JSON"),
        ("/v1/vdisks/base/settings", [1, 2], 400, "JSON object"),
        ("/v1/vdisks/nothing/settings", {"version": 3}, 404, "no server of the site holds"),
        ("/v1/vdisks/..%2Fetc/settings", {"version": 3}, 400, ""),
        ("/v1/servers/s9/stop-stream", {}, 404, "no server named 's9'"),
        ("/v1/nowhere", {}, 404, "no endpoint"),
    ],
)
def test_bad_requests_get_a_json_error_that_says_what_to_do(
    site: Site, path: str, body: Any, status: int, said: str
) -> None:
    got, answer = signed(site, 0, "POST", path, body)
    assert got == status, answer
    assert said in answer["error"], answer
    assert "Traceback" not in answer["error"]
    base = load_properties(properties_path(site.stores[0] / "base.img"))
    assert base.load_balancing and base.version == 1


# -- authentication --------------------------------------------------------------------------


def test_unauthenticated_requests_are_refused_and_the_server_keeps_serving(site: Site) -> None:
    address = site.admin[2]
    before = site.client(2).get("/v1/site")["admin"]["auth_failures"]
    status, answer = raw_request(address, "GET", "/v1/servers")
    assert status == 401 and "no Authorization header" in answer["error"]
    wrong = sign(bytes(32), "GET", "/v1/servers", b"", time.time_ns() // 1_000_000, target=address)
    status, answer = raw_request(address, "GET", "/v1/servers", header=wrong)
    assert status == 401 and "site key" in answer["error"]
    old = sign(
        site.key, "GET", "/v1/servers", b"", time.time_ns() // 1_000_000 - 120_000,
        target=address,
    )
    status, answer = raw_request(address, "GET", "/v1/servers", header=old)
    assert status == 401 and "NTP" in answer["error"]
    body = json.dumps({"description": "once"}).encode()
    path = "/v1/vdisks/base/settings"
    header = sign(site.key, "POST", path, body, time.time_ns() // 1_000_000, target=address)
    status, answer = raw_request(address, "POST", path, body, header)
    assert status == 200 and answer["ok"], answer
    status, answer = raw_request(address, "POST", path, body, header)
    assert status == 401 and "already accepted" in answer["error"]
    status, answer = raw_request(address, "POST", "/v1/servers/s1/stop-stream", b"", header)
    assert status == 401  # a signature is good for one request only

    counters = site.client(2).get("/v1/site")["admin"]
    assert counters["auth_failures"] == before + 5
    assert {"missing", "bad_mac", "stale", "replayed"} <= set(counters["auth_failures_by_reason"])
    assert site.servers[2].find_logs("admin_auth_failed", reason="replayed")
    servers = site.client(2).get("/v1/servers")["servers"]
    assert [s["state"] for s in servers] == ["serving"] * 3
    assert site.servers[0].find_logs("listening")  # s1 was never told to stop


# -- pvsctl ----------------------------------------------------------------------------------


def test_pvsctl_shows_the_site(site: Site) -> None:
    servers = site.pvsctl("servers", index=1)
    assert servers.returncode == 0, servers.stderr
    for server in site.servers:
        assert server.name in servers.stdout and server.address in servers.stdout
    assert "s2 *" in servers.stdout and "serving" in servers.stdout
    env = {"PVS_ADMIN": site.admin[0], "PVS_KEY_FILE": str(site.key_file)}
    vdisks = pvsctl("vdisks", env=env)
    assert vdisks.returncode == 0, vdisks.stderr
    assert all(name in vdisks.stdout for name in VDISKS) and "identical" in vdisks.stdout
    raw = pvsctl("servers", "--json", env=env)
    assert raw.returncode == 0, raw.stderr
    assert sorted(s["name"] for s in json.loads(raw.stdout)["servers"]) == ["s1", "s2", "s3"]
    targets = pvsctl("--json", "targets", env=env)
    assert targets.returncode == 0 and json.loads(targets.stdout)["errors"] == []
    status = site.pvsctl("site", "status")
    assert status.returncode == 0 and "Peers up" in status.stdout and "2 of 2" in status.stdout


def test_pvsctl_errors_are_one_line_and_exit_2(site: Site, tmp_path: Path) -> None:
    closed = f"127.0.0.13:{free_port('127.0.0.13', span=1)}"
    result = pvsctl("--admin", closed, "--key-file", str(site.key_file), "servers")
    assert result.returncode == 2
    assert closed in result.stderr and "connection refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    other_key = tmp_path / "other.key"
    made = pvsctl("site", "keygen", "--output", str(other_key))
    assert made.returncode == 0 and oct(other_key.stat().st_mode & 0o777) == "0o600"
    again = pvsctl("site", "keygen", "--output", str(other_key))
    assert again.returncode == 2 and "exists" in again.stderr
    wrong = pvsctl("--admin", site.admin[0], "--key-file", str(other_key), "vdisks")
    assert wrong.returncode == 2 and "401" in wrong.stderr and "site key" in wrong.stderr
    missing = pvsctl("servers")
    assert missing.returncode == 2 and "--admin" in missing.stderr
    nowhere = pvsctl("vdisk", "set", "tools", "--version", "3")
    assert nowhere.returncode == 2 and "--store" in nowhere.stderr
    assert all("Traceback" not in r.stderr for r in (result, again, wrong, missing, nowhere))


def test_stop_and_start_stream_through_another_server(site: Site) -> None:
    def s2_state(state: str) -> Callable[[], bool]:
        def check() -> bool:
            servers = site.client(2).get("/v1/servers")["servers"]
            return any(s["name"] == "s2" and s["state"] == state for s in servers)

        return check

    try:
        stopped = site.pvsctl("stop-stream", "s2", index=0)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.startswith("s2: stream service stopped")
        until(s2_state("stopped"), 5, "s3 to see s2 stopped")
    finally:
        started = site.pvsctl("start-stream", "s2", index=2)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "s2: stream service serving"
    until(s2_state("serving"), 5, "s1 to see s2 serving again")


def test_an_admin_client_error_names_the_address() -> None:
    client = AdminClient("127.0.0.13:1", b"k" * 32, timeout=2)
    with pytest.raises(UserError, match=r"127\.0\.0\.13:1"):
        client.get("/v1/servers")


if shutil.which("cp") is None:  # pragma: no cover - every Linux has it
    pytest.skip("cp is needed to replicate like an administrator", allow_module_level=True)
