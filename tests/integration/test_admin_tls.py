"""The admin API over TLS, end to end: certificates made by ``pvsctl site certs``, two pvsd
that serve HTTPS and check each other against the site CA, pvsctl checking the servers'
certificates; a request signed for one server and replayed to the other, a body with a lone
surrogate, and the audit line of a change.

One site of two servers serves the whole module; each test changes only what it reads back.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import Pvsd, free_port, loopback_host, make_vdisk

from pvsd import tls
from pvsd.admin_auth import key_id, sign
from pvsd.config import read_key
from pvsd.properties import load_properties, properties_path

MIB = 1024 * 1024


@dataclass
class Site:
    servers: list[Pvsd]
    admin: list[str]
    stores: list[Path]
    key_file: Path
    key: bytes
    certs: Path
    other_certs: Path

    @property
    def ca(self) -> Path:
        return self.certs / "ca.pem"

    def pvsctl(
        self, *args: str, index: int = 0, ca: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        options = ["--admin", self.admin[index], "--key-file", str(self.key_file)]
        if ca is not None:
            options += ["--ca", str(ca)]
        return pvsctl(*options, *args, env=env)


def pvsctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PVS_")}
    environment |= {"COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", *args], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=environment, check=False,
    )


def until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.1)
    return result


def make_certs(out: Path, servers: list[Pvsd], *extra: str) -> None:
    args = [arg for s in servers for arg in ("--server", f"{s.name}={s.host}")]
    made = pvsctl("site", "certs", "--out", str(out), *args, *extra)
    assert made.returncode == 0, made.stderr
    assert "admin_tls_cert" in made.stdout and made.stderr == ""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("tls-site")
    key_file = root / "site.key"
    made = pvsctl("site", "keygen", "--output", str(key_file))
    assert made.returncode == 0, made.stderr
    stores = [root / "store1", root / "store2"]
    make_vdisk(stores[0], "disk", MIB, seed=3)
    stores[1].mkdir()
    for file in stores[0].glob("disk.*"):  # as an administrator replicates: cp -p
        if not file.name.endswith(".identity.json"):
            shutil.copy2(file, stores[1] / file.name)
    hosts = [loopback_host(), loopback_host()]
    ports = [free_port(host, span=2) for host in hosts]
    servers = [
        Pvsd(f"s{i + 1}", stores[i], root, host=hosts[i], port=ports[i]) for i in range(2)
    ]
    certs, other_certs = root / "certs", root / "other-certs"
    make_certs(certs, servers, "--client", "admin")
    make_certs(other_certs, servers)  # another site's CA, with the same names and hosts
    admin = [f"{s.host}:{s.port + 1}" for s in servers]
    for index, server in enumerate(servers):
        other = servers[1 - index]
        server.args = [
            "--key-file", str(key_file), "--peer", other.address, "--admin", admin[index],
            "--heartbeat-interval", "0.2", "--watch-interval", "0.2",
            "--admin-tls-cert", str(certs / f"{server.name}.pem"),
            "--admin-tls-key", str(certs / f"{server.name}.key"),
            "--admin-tls-ca", str(certs / "ca.pem"),
        ]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.callback(server.kill)
            stack.callback(server.stop)
        for server in servers:
            server.start(vdisks=["disk"])
        for index, server in enumerate(servers):
            server.wait_for_log("admin_listening", address=admin[index], tls=True)
            server.wait_for_log("peer_inventory", timeout=15, peer=servers[1 - index].name)
        yield Site(servers, admin, stores, key_file, read_key(key_file), certs, other_certs)
        for server in servers:
            assert server.alive(), server.log_tail()
            assert not server.trouble(), f"{server.name}: {server.trouble()}"
            assert not server.find_logs("admin_internal_error")


def raw_request(
    site: Site, index: int, method: str, path: str, body: bytes, signed_for: int,
    *, host: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """A request signed for server ``signed_for``, sent over TLS to server ``index`` with
    the Host header ``host`` (default: the signed server's address, as captured)."""
    target = site.admin[signed_for]
    header = sign(site.key, method, path, body, time.time_ns() // 1_000_000, target=target)
    address, port = site.admin[index].rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        address, int(port), context=tls.client_context(site.ca), timeout=15
    )
    try:
        connection.putrequest(method, path, skip_host=True)
        connection.putheader("Host", host or target)
        connection.putheader("Authorization", header)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def description(site: Site, index: int) -> str:
    return load_properties(properties_path(site.stores[index] / "disk.img")).description


def test_pvsctl_over_tls_sees_the_whole_site(site: Site) -> None:
    for index in range(2):
        answer = site.pvsctl("servers", "--json", index=index, ca=site.ca)
        assert answer.returncode == 0, answer.stderr
        servers = json.loads(answer.stdout)["servers"]
        assert sorted((s["name"], s["up"]) for s in servers) == [("s1", True), ("s2", True)]
    # a site-wide read asks the peer over TLS, checking its certificate by name
    vdisks = site.pvsctl("vdisks", "--json", index=1, env={"PVS_CA": str(site.ca)})
    assert vdisks.returncode == 0, vdisks.stderr
    assert json.loads(vdisks.stdout)["errors"] == []


def test_pvsctl_refuses_a_certificate_of_another_ca(site: Site) -> None:
    wrong = site.pvsctl("servers", ca=site.other_certs / "ca.pem")
    assert wrong.returncode == 2 and wrong.stdout == ""
    lines = wrong.stderr.splitlines()
    assert len(lines) == 1 and "does not vouch for" in lines[0] and "--ca" in lines[0], lines
    assert site.admin[0] in lines[0]
    plain = site.pvsctl("servers")  # no --ca: plain HTTP to a TLS port
    assert plain.returncode == 2 and len(plain.stderr.splitlines()) == 1
    assert "give --ca FILE" in plain.stderr
    missing = site.pvsctl("servers", ca=site.certs / "nothing.pem")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in wrong.stderr + plain.stderr + missing.stderr


def test_a_change_is_applied_site_wide_and_audited_on_each_server(site: Site) -> None:
    changed = site.pvsctl(
        "vdisk", "set", "disk", "--description", "audited", "--ca", str(site.ca),
        "--cert", str(site.certs / "admin.pem"), "--cert-key", str(site.certs / "admin.key"),
    )
    assert changed.returncode == 0, changed.stderr
    assert description(site, 0) == description(site, 1) == "audited"
    one, two = site.servers
    key = key_id(site.key)
    line = one.wait_for_log("admin_audit", path="/v1/vdisks/disk/settings")
    assert line["who"]["certificate"] == "CN=admin" and line["who"]["key_id"] == key
    assert line["body"] == {"description": "audited"} and line["outcome"] == "done"
    assert line["before"]["s1"]["description"] == ""
    assert line["after"] == {
        "s1": line["after"]["s1"], "s2": line["after"]["s2"]
    } and line["after"]["s2"]["description"] == "audited"
    part = two.wait_for_log("admin_audit", path="/v1/local/vdisks/disk/settings")
    assert part["who"]["certificate"] == "CN=s1"  # the forwarding server, by its certificate
    assert part["before"]["s2"]["description"] == "" and part["status"] == 200
    assert part["after"]["s2"]["description"] == "audited"


def test_a_request_replayed_to_another_server_is_refused(site: Site) -> None:
    path = "/v1/vdisks/disk/settings"
    body = json.dumps({"description": "replayed"}).encode()
    before = description(site, 1)
    # captured on its way to s1, replayed to s2 as it was
    status, answer = raw_request(site, 1, "POST", path, body, signed_for=0)
    assert status == 401 and "signed for" in answer["error"], answer
    assert site.servers[1].wait_for_log(
        "admin_auth_failed", reason="wrong_server", host=site.admin[0]
    )
    # ... or with its Host header rewritten for s2: the MAC covers it
    status, answer = raw_request(site, 1, "POST", path, body, signed_for=0, host=site.admin[1])
    assert status == 401 and "signature does not match" in answer["error"], answer
    assert description(site, 1) == before
    assert not site.servers[1].find_logs("admin_audit", body={"description": "replayed"})
    # the server it was meant for takes it (once)
    status, answer = raw_request(site, 0, "POST", path, body, signed_for=0)
    assert status == 200 and answer["ok"], answer
    until(lambda: description(site, 1) == "replayed", what="s2 to take the forwarded change")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/vdisks/disk/settings", b'{"description": "\\ud800"}'),
        ("/v1/vdisks/disk/versions", b'{"\\udfff": 1}'),
        ("/v1/vdisks/disk/replicate", b'{"to": ["\\udbff"]}'),
        ("/v1/rebalance", b'{"dry_run": "\\ud800"}'),
        ("/v1/local/vdisks/disk/settings", b'{"description": "x\\udc00"}'),
    ],
)
def test_a_lone_surrogate_in_a_body_is_a_400(site: Site, path: str, body: bytes) -> None:
    status, answer = raw_request(site, 0, "POST", path, body, signed_for=0)
    assert status == 400, answer
    assert "surrogate" in answer["error"], answer
