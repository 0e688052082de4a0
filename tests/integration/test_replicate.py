"""Replication between real pvsd processes: pvsctl vdisk replicate, progress, resume after the
receiving server is killed, the result checked, and bad input refused.

One site of two servers serves the module; each test copies its own vDisk from s1 (which
alone holds it at the start) to s2, so that the order of the tests does not matter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import make_vdisk
from sites import MIB, Site, restart

from pvs_protocol.manifest import Manifest
from pvsd.config import read_key
from pvsd.console import UserError
from pvsd.console.client import AdminClient
from pvsd.manifest import manifest_path
from pvsd.transfer import partial_name, record_name
from pvsd.versions import image_file

SOLO, SLOW, EMPTY, BAD, FIX = "solo", "slow", "empty", "bad", "fix"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    built = Site(tmp_path_factory.mktemp("replicate"), count=2)
    store1 = built.workdir / "store1"
    make_vdisk(store1, SOLO, 8 * MIB, seed=11)
    make_vdisk(store1, SLOW, 16 * MIB, seed=12)
    make_vdisk(store1, EMPTY, 8 * MIB, seed=None)
    make_vdisk(store1, BAD, 4 * MIB, seed=13)
    make_vdisk(store1, FIX, 4 * MIB, seed=14)
    # s1 never looks at its images again, and never scrubs them: a copy changed under it
    # stays served until someone tells it (as a disk that rots under the page cache would)
    built.servers[0].args += ["--watch-interval", "1000", "--scrub-rate", "0"]
    try:
        built.start()
        for name in (SOLO, SLOW, EMPTY, BAD, FIX):
            built.servers[0].wait_for_log("identity_published", vdisk=name)
        yield built
    finally:
        built.stop()


def admin(site: Site, index: int = 0) -> str:
    server = site.servers[index]
    return f"{server.host}:{server.port + 1}"


def client(site: Site, index: int = 0) -> AdminClient:
    return AdminClient(admin(site, index), read_key(site.key))


def pvsctl(site: Site, *args: str, index: int = 0) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PVS_ADMIN", "PVS_KEY_FILE")}
    return subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", "--admin", admin(site, index), "--key-file",
         str(site.key), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=environment | {"COLUMNS": "200"}, check=False,
    )


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def statuses(site: Site, name: str, index: int = 0) -> dict[str, str]:
    answer = client(site, index).get(f"/v1/replications?vdisk={name}")
    (version,) = answer["versions"]
    return {server["server"]: server["status"] for server in version["servers"]}


def copy_on(site: Site, server: str, name: str) -> dict[str, Any] | None:
    try:
        answer = client(site).get(f"/v1/replications?vdisk={name}")
    except UserError:
        return None
    return next((c for c in answer["replications"] if c["server"] == server), None)


def same_copy(site: Site, name: str) -> None:
    """s2 serves the copy with the source's identity, its manifest is the source's byte for
    byte, and pvsctl finds every block good."""
    until(lambda: statuses(site, name) == {"s1": "identical", "s2": "identical"}, 15,
          f"s2 to serve {name} with s1's identity")
    store1, store2 = site.workdir / "store1", site.workdir / "store2"
    copy = store2 / image_file(name, 1)
    source = (store1 / f"{name}.manifest").read_bytes()
    assert manifest_path(copy).read_bytes() == source
    assert copy.read_bytes() == (store1 / f"{name}.img").read_bytes()
    assert not list(store2.glob(f".{name}*")), "the partial image and its record are gone"
    verify = subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", "vdisk", "verify", name, "--version", "1", "--store",
         str(store2)], capture_output=True, text=True, timeout=60, check=False,
    )
    assert verify.returncode == 0, verify.stderr + verify.stdout
    assert Manifest.decode(source).identity.short in statuses_shorts(site, name)


def statuses_shorts(site: Site, name: str) -> set[str]:
    answer = client(site, 1).get(f"/v1/replications?vdisk={name}")
    return {server["short"] for server in answer["versions"][0]["servers"]}


def test_replicate_with_progress_then_identical(site: Site) -> None:
    started = time.monotonic()
    result = pvsctl(site, "vdisk", "replicate", SOLO, "--to", "s2", "--rate", "2M")
    assert result.returncode == 0, result.stderr
    assert "from s1" in result.stdout and "s2: done: 8.0 MiB fetched" in result.stdout
    assert "s2: fetching blocks: " in result.stderr, "progress lines while it copies"
    assert time.monotonic() - started > 3.5, "--rate 2M paces an 8 MiB copy"
    same_copy(site, SOLO)
    s2 = site.by_name("s2")
    s2.wait_for_log("identity_cached", vdisk=SOLO)  # recorded as verified: not read again
    copy = site.workdir / "store2" / image_file(SOLO, 1)
    assert not s2.find_logs("verify_started", path=str(copy))
    done = s2.wait_for_log("replication_done", vdisk=SOLO)
    assert done["bytes_transferred"] == 8 * MIB
    assert s2.find_logs("replication_progress", vdisk=SOLO), "progress is logged"

    again = pvsctl(site, "vdisk", "replicate", SOLO, "--all")
    assert again.returncode == 0, again.stderr
    assert "s2: holds an identical copy already" in again.stdout
    view = pvsctl(site, "vdisk", "replication", SOLO)
    assert view.returncode == 0, view.stderr
    assert "identical" in view.stdout and "done" in view.stdout


def test_zero_blocks_are_not_fetched_and_stay_holes(site: Site) -> None:
    result = pvsctl(site, "vdisk", "replicate", EMPTY, "--to", "s2", "--json")
    assert result.returncode == 0, result.stderr
    s2 = site.by_name("s2")
    assert s2.wait_for_log("replication_done", vdisk=EMPTY)["bytes_transferred"] == 0
    image = site.workdir / "store2" / image_file(EMPTY, 1)
    until(lambda: statuses(site, EMPTY).get("s2") == "identical", 15, "the empty copy served")
    assert image.stat().st_size == 8 * MIB and image.stat().st_blocks * 512 < MIB


def test_killed_receiver_resumes_and_fetches_only_what_is_missing(site: Site) -> None:
    result = pvsctl(site, "vdisk", "replicate", SLOW, "--to", "s2", "--rate", "4M", "--no-wait")
    assert result.returncode == 0, result.stderr
    assert "s2: copying" in result.stdout
    until(lambda: ((copy_on(site, "s2", SLOW) or {}).get("percent") or 0) >= 25, 20,
          "a quarter of the copy")
    s2 = site.by_name("s2")
    s2.kill()  # SIGKILL: no chance to tidy up
    store2 = site.workdir / "store2"
    assert (store2 / partial_name(image_file(SLOW, 1))).exists()
    assert (store2 / record_name(image_file(SLOW, 1))).exists()
    assert not (store2 / image_file(SLOW, 1)).exists()
    restart(s2)  # the copy resumes by itself at start
    resumed = s2.wait_for_log("replication_resumed", 20, vdisk=SLOW)
    assert resumed["bytes_good"] >= 4 * MIB and resumed["bytes_to_fetch"] < 16 * MIB
    done = s2.wait_for_log("replication_done", 30, vdisk=SLOW)
    assert 0 < done["bytes_transferred"] <= 12 * MIB, "only the blocks it did not have"
    same_copy(site, SLOW)
    assert not [line for line in s2.trouble() if "replicat" in str(line)]


def test_bad_input_is_refused_with_what_to_do(site: Site) -> None:
    cases = [
        (["vdisk", "replicate", SOLO, "--to", "nowhere"], "no server named 'nowhere'"),
        (["vdisk", "replicate", "nosuch", "--all"], "no server of the site holds a vDisk named"),
        (["vdisk", "replicate", SOLO, "--version", "9", "--all"], "versions held: 1"),
        (["vdisk", "replicate", SOLO, "--to", "s2", "--rate", "fast"], "write bytes per second"),
        (["vdisk", "replicate", "../x", "--all"], "not allowed"),
        (["vdisk", "replicate", SOLO], "one of the arguments --to --all is required"),
    ]
    for args, message in cases:
        result = pvsctl(site, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    source = client(site)
    for query, message in [
        ("offset=0&length=99999999", "at most 4194304 bytes"),
        (f"offset={8 * MIB}&length=4096", "outside the image"),
        ("offset=-4096&length=4096", "outside the image"),
        ("offset=x&length=1", "whole numbers"),
    ]:
        with pytest.raises(UserError, match=message):
            source.get(f"/v1/local/replicas/{SOLO}/1/blocks?{query}")
    with pytest.raises(UserError, match="holds no version 7 of solo"):
        source.get(f"/v1/local/replicas/{SOLO}/7")
    with pytest.raises(UserError, match="not the copy asked for"):
        source.get(f"/v1/local/replicas/{SOLO}/1?digest={'0' * 64}")



def test_a_source_that_sends_bad_blocks_is_named_and_told(site: Site) -> None:
    with (site.workdir / "store1" / f"{BAD}.img").open("r+b") as image:
        image.seek(3 * MIB + 5)
        image.write(b"rot!")
    result = pvsctl(site, "vdisk", "replicate", BAD, "--to", "s2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "s1's copy is suspect" in result.stderr and "twice" in result.stderr
    s2 = site.by_name("s2")
    block = 3 * MIB // (16 * 1024)
    s2.wait_for_log("replication_bad_block", vdisk=BAD, attempt=2, block=block)
    s2.wait_for_log("replication_failed", vdisk=BAD, source="s1")
    assert not (site.workdir / "store2" / image_file(BAD, 1)).exists()
    # told of the block, s1 reads it again and stops offering its copy
    until(lambda: statuses(site, BAD) == {"s1": "damaged", "s2": "failed"}, 15,
          "s1's copy found damaged, s2's copy failed")
    again = pvsctl(site, "vdisk", "replicate", BAD, "--to", "s2")
    assert again.returncode == 2 and "damaged on s1" in again.stderr, again.stderr
    view = pvsctl(site, "vdisk", "replication", BAD)
    assert "damaged" in view.stdout and "failed" in view.stdout, view.stdout


def test_a_damaged_copy_is_repaired_block_by_block(site: Site) -> None:
    assert pvsctl(site, "vdisk", "replicate", FIX, "--to", "s2").returncode == 0
    until(lambda: statuses(site, FIX).get("s2") == "identical", 15, "s2's copy served")
    with (site.workdir / "store2" / image_file(FIX, 1)).open("r+b") as image:
        image.seek(MIB)
        image.write(b"rot!")  # s2 notices the change and finds the copy damaged
    until(lambda: statuses(site, FIX).get("s2") == "damaged", 15, "s2's copy damaged")
    result = pvsctl(site, "vdisk", "replicate", FIX, "--all")
    assert result.returncode == 0, result.stderr
    assert "s2: copying (repairing its damaged copy)" in result.stdout
    s2 = site.by_name("s2")
    s2.wait_for_log("replication_repairs", vdisk=FIX)
    done = s2.wait_for_log("replication_done", count=2, vdisk=FIX)
    assert done["bytes_transferred"] == 16 * 1024, "only the damaged block"
    same_copy(site, FIX)
