"""Server names in a real site: a second pvsd started with a name already taken (a copied
configuration) stops with exit code 2 and both sides say so, while the peers keep the real
server up; and ``pvsctl servers forget`` removes a server that left for good.

Two pvsd processes with empty stores (no vDisk is needed to be a server of a site)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Pvsd
from sites import keygen

from pvsd.config import read_key
from pvsd.console import UserError
from pvsd.console.client import AdminClient

PEER_TIMEOUT = 2.0
STEADY_PEER_TIMEOUT = 4.0
"""Where a test asserts that a server was never down: room for a loaded machine."""


@contextlib.contextmanager
def pair(
    workdir: Path, peer_timeout: float = PEER_TIMEOUT
) -> Iterator[tuple[Pvsd, Pvsd, Path]]:
    """Servers s1 and s2 of one site, each listing the other; stopped on the way out."""
    key = workdir / "site.key"
    key.write_text(keygen())
    servers = [Pvsd(name, workdir / f"store-{name}", workdir) for name in ("s1", "s2")]
    for server in servers:
        server.stores[0].mkdir()
    for server in servers:
        other = next(s for s in servers if s is not server)
        server.args = site_args(server, key, other, peer_timeout=peer_timeout)
    try:
        for server in servers:
            server.start()
        for server in servers:
            other = next(s for s in servers if s is not server)
            server.wait_for_log("peer_inventory", peer=other.name)
        yield servers[0], servers[1], key
    finally:
        for server in servers:
            try:
                server.stop()
            finally:
                server.kill()


def site_args(
    server: Pvsd, key: Path, *peers: Pvsd, peer_timeout: float = PEER_TIMEOUT
) -> list[str]:
    return [
        "--key-file", str(key), "--peer-timeout", str(peer_timeout), "--drain-timeout", "5",
        "--admin", f"{server.host}:{server.port + 1}",
        *[arg for peer in peers for arg in ("--peer", peer.address)],
    ]


def pvsctl(server: Pvsd, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PVS_")}
    return subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", "--admin", f"{server.host}:{server.port + 1}",
         "--key-file", str(key), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
        env={**environment, "COLUMNS": "200"},
    )


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return result


def test_a_copy_with_a_taken_name_stops_and_the_real_server_stays_up(tmp_path: Path) -> None:
    with pair(tmp_path, STEADY_PEER_TIMEOUT) as (s1, s2, key):
        # A new machine set up from s1's configuration: name s1, s1's peers (s2).
        copy = Pvsd("s1", tmp_path / "copy" / "store", tmp_path / "copy")
        copy.stores[0].mkdir()
        copy.args = site_args(copy, key, s2, peer_timeout=STEADY_PEER_TIMEOUT)
        try:
            copy.start()
            assert copy.wait(timeout=30) == 2, copy.log_tail()
        finally:
            copy.kill()
        # The copy said why, naming the server that has the name, and stopped cleanly.
        said = copy.find_logs("duplicate_server_name")
        assert said and said[0]["other"] == s1.address and "name" in said[0]["action"], said
        assert said[0]["level"] == "error"
        assert copy.find_logs("stopped") and not copy.trouble(), copy.log_tail()
        # The peer named both and what to do; the real server was told too.
        clash = s2.wait_for_log("duplicate_server_name", name="s1")
        assert s1.address in clash["kept"] and copy.address in clash["refused"], clash
        assert copy.address in clash["action"]
        told = s1.wait_for_log("duplicate_server_name", name="s1")
        assert told["other"] == copy.address, told
        assert s1.alive(), "the server that was there first goes on"
        # Once the copy is gone the peer says so; the real server was never down.
        s2.wait_for_log("duplicate_server_gone", name="s1", timeout=20)
        assert not s2.find_logs("peer_down", peer="s1"), s2.log_tail()
        dropped = s2.find_logs("site_message_dropped", reason="replayed")
        assert not dropped, dropped
        servers = AdminClient(f"{s2.host}:{s2.port + 1}", read_key(key)).get("/v1/servers")
        real = next(server for server in servers["servers"] if server["name"] == "s1")
        assert real["up"] and real["stream_address"] == s1.address, servers
        assert not s1.trouble() and not s2.trouble()


def test_servers_forget_removes_a_server_that_is_down(tmp_path: Path) -> None:
    with pair(tmp_path) as (s1, s2, key):
        client = AdminClient(f"{s1.host}:{s1.port + 1}", read_key(key))
        refused = pvsctl(s1, key, "servers", "forget", "s2")
        assert refused.returncode == 2 and "s2 is up" in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        for name, said in (
            ("s1", "(HTTP 409): s1 is the server you asked"),
            ("nobody", "(HTTP 404): no server named 'nobody'"),
            ("a..b", "(HTTP 400): server name 'a..b' contains '..'"),
        ):
            with pytest.raises(UserError) as caught:
                client.post(f"/v1/servers/{name}/forget", {})
            assert said in str(caught.value), str(caught.value)
        assert s2.stop() == 0
        s1.wait_for_log("peer_down", peer="s2", timeout=15)
        forgotten = pvsctl(s1, key, "servers", "forget", "s2")
        assert forgotten.returncode == 0, forgotten.stderr
        assert "s1: forgot it" in forgotten.stdout and "s2 forgotten" in forgotten.stdout
        s1.wait_for_log("peer_forgotten", peer="s2")
        audit = s1.find_logs("admin_audit")
        assert any("/v1/servers/s2/forget" in str(line) for line in audit), audit
        assert "s2" not in names(client)
        # It comes back when it speaks again.
        s2.process = None
        s2.start()
        s1.wait_for_log("peer_joined", peer="s2", count=2, timeout=15)
        until(lambda: "s2" in names(client), 15, "s2 listed again")


def names(client: AdminClient) -> list[str]:
    return [str(server["name"]) for server in client.get("/v1/servers")["servers"]]
