"""vDisk versions on a real site: new, maintenance writes, test devices, promote, pending,
replicate, failover on the pinned version, merge and delete.

Three pvsd hold vDisk ``disk`` version 1 (a plain ``disk.img``). Version 2 is made on one of
them, written by the maintenance device, promoted, replicated; the tests check at each step
which version each kind of device gets, and that a target streaming an older version keeps
it, also across a failover.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import PYTHON, logged_in, read_whole
from sites import Site, running_site, until

from pvs_protocol.errors import ErrorCode
from pvs_target.failover import FailoverSettings, VDiskStream
from pvs_target.login import LoginError

MIB = 1 << 20
FAST = FailoverSettings(keepalive_interval=0.3, dead_after=1.0, connect_timeout=1.0)
CHANGE = b"version two " * 100


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with running_site(tmp_path) as built:
        yield built


def ctl(
    site: Site, *args: str, index: int = 0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    server = site.servers[index]
    result = subprocess.run(
        [PYTHON, "-m", "pvsd.ctl", *args, "--admin", f"{server.host}:{server.port + 1}",
         "--key-file", str(site.key)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )
    if check:
        assert result.returncode == 0, f"pvsctl {' '.join(args)}: {result.stderr}"
    return result


def versions(site: Site, index: int = 0) -> dict[int, dict[str, Any]]:
    answer = json.loads(ctl(site, "vdisk", "versions", "disk", "--json", index=index).stdout)
    return {row["version"]: row for row in answer["versions"]}


async def version_of(site: Site, device: str, index: int = 0) -> int:
    async with logged_in(site.servers[index].address, "disk", device) as session:
        return session.identity.version


async def new_version_written(site: Site) -> None:
    """Version 2 made on s1 and changed by the maintenance device ``admin-pc``."""
    ctl(site, "vdisk", "set", "disk", "--maintenance-devices", "admin-pc",
        "--test-devices", "lab-*")
    made = ctl(site, "vdisk", "version", "new", "disk")
    assert "version 2 of disk made on s1" in made.stdout, made.stdout
    async with logged_in(site.servers[0].address, "disk", "admin-pc") as writer:
        assert writer.identity.version == 2 and not writer.read_only
        assert writer.server_name == "s1"
        await writer.connection.write(0, CHANGE)
        await writer.connection.flush()


async def test_a_version_goes_from_maintenance_to_production(site: Site) -> None:
    await new_version_written(site)
    rows = versions(site, index=1)
    assert rows[2]["state"] == "maintenance" and rows[2]["holders"] == ["s1"]
    assert rows[1]["state"] == "production" and rows[1]["holders"] == ["s1", "s2", "s3"]
    # nobody but the maintenance device gets a maintenance version
    assert await version_of(site, "ordinary") == 1
    assert await version_of(site, "lab-7") == 1
    ctl(site, "vdisk", "version", "promote", "disk")
    assert versions(site)[2]["state"] == "test"
    assert await version_of(site, "lab-7", index=2) == 2  # redirected to s1, which holds it
    assert await version_of(site, "ordinary", index=2) == 1
    ctl(site, "vdisk", "version", "promote", "disk", "--version", "2")
    rows = versions(site)
    assert rows[2]["state"] == "production" and rows[2]["pending"]
    assert rows[2]["lacking"] == ["s2", "s3"]
    assert await version_of(site, "ordinary") == 1  # pending: not for ordinary logins yet
    async with logged_in(site.servers[1].address, "disk", "old-timer") as old:
        assert old.identity.version == 1
        ctl(site, "vdisk", "replicate", "disk", "--version", "2", "--all")
        await until(lambda: not versions(site)[2]["pending"], 60, "version 2 everywhere")
        for index in range(3):
            async with logged_in(site.servers[index].address, "disk", f"new-{index}") as new:
                assert new.identity.version == 2
                data = await read_whole(new)
                assert data[: len(CHANGE)] == CHANGE and data[len(CHANGE):] == site.data[
                    len(CHANGE):]
        assert (await read_whole(old)) == site.data  # the running target keeps version 1


async def test_failover_keeps_a_target_on_the_version_it_pinned(site: Site) -> None:
    await new_version_written(site)
    stream = VDiskStream(site.addresses, "disk", "steady", settings=FAST)
    await stream.open()
    try:
        first = stream.status()["server"]["name"]
        assert stream.status()["identity"]["version"] == 1
        ctl(site, "vdisk", "version", "promote", "disk", "--to", "production")
        ctl(site, "vdisk", "replicate", "disk", "--version", "2", "--all")
        await until(lambda: not versions(site)[2]["pending"], 60, "version 2 everywhere")
        site.by_name(first).kill()
        await until(lambda: len(stream.history) >= 1, 20, "a failover")
        assert stream.status()["identity"]["version"] == 1
        assert stream.status()["server"]["name"] != first
        assert await stream.read(0, MIB) == site.data[:MIB]
    finally:
        await stream.close()


async def test_one_maintenance_device_and_no_promotion_while_it_writes(site: Site) -> None:
    ctl(site, "vdisk", "set", "disk", "--maintenance-devices", "admin-*")
    ctl(site, "vdisk", "version", "new", "disk")
    async with logged_in(site.servers[0].address, "disk", "admin-1") as writer:
        assert writer.identity.version == 2
        with pytest.raises(LoginError) as second:
            async with logged_in(site.servers[0].address, "disk", "admin-2"):
                pass
        assert second.value.code is ErrorCode.BUSY
        refused = ctl(site, "vdisk", "version", "promote", "disk", check=False)
        assert refused.returncode == 2
        assert "still written by admin-1" in refused.stderr, refused.stderr
    again = ctl(site, "vdisk", "version", "new", "disk", check=False)
    assert again.returncode == 2 and "in maintenance already" in again.stderr


async def test_delete_and_merge_spare_versions_in_use(site: Site) -> None:
    ctl(site, "vdisk", "version", "new", "disk")
    ctl(site, "vdisk", "version", "promote", "disk", "--to", "production")
    ctl(site, "vdisk", "replicate", "disk", "--version", "2", "--all")
    await until(lambda: not versions(site)[2]["pending"], 60, "version 2 everywhere")
    stream = VDiskStream([site.servers[1].address], "disk", "user", settings=FAST)
    async with logged_in(site.servers[1].address, "disk", "user-1") as user:
        assert user.identity.version == 2
    await stream.open()
    try:
        assert stream.status()["identity"]["version"] == 2
        refused = ctl(site, "vdisk", "version", "delete", "disk", "--version", "2", check=False)
        assert refused.returncode == 2 and "in use by user" in refused.stderr, refused.stderr
        merged = json.loads(ctl(site, "vdisk", "version", "merge", "disk", "--json").stdout)
        assert merged["base"] == 2 and [r["version"] for r in merged["removed"]] == [1]
        rows = versions(site)
        assert sorted(rows) == [2]
        for store in (site.workdir / f"store{i}" for i in (1, 2, 3)):
            assert not (store / "disk.img").exists()
    finally:
        await stream.close()


async def test_bad_version_requests_say_what_to_do(site: Site) -> None:
    unknown = ctl(site, "vdisk", "versions", "nothing", check=False)
    assert unknown.returncode == 2 and "no server of the site holds a vDisk" in unknown.stderr
    production = ctl(site, "vdisk", "version", "promote", "disk", "--version", "1", check=False)
    assert production.returncode == 2 and "production already" in production.stderr
    missing = ctl(site, "vdisk", "version", "delete", "disk", "--version", "9", check=False)
    assert missing.returncode == 2 and "has no version 9" in missing.stderr
    only = ctl(site, "vdisk", "version", "delete", "disk", "--version", "1", check=False)
    assert only.returncode == 2 and "only version" in only.stderr
    ctl(site, "vdisk", "version", "new", "disk")
    ctl(site, "vdisk", "version", "promote", "disk")  # 2: test
    ctl(site, "vdisk", "version", "new", "disk")  # 3: maintenance, from 2
    ctl(site, "vdisk", "version", "promote", "disk", "--version", "3", "--to", "production")
    out_of_order = ctl(site, "vdisk", "version", "promote", "disk", "--version", "2",
                       check=False)
    assert out_of_order.returncode == 2
    assert "version 3 of disk is newer" in out_of_order.stderr, out_of_order.stderr


async def test_a_cutting_change_names_the_streaming_targets_and_needs_force(site: Site) -> None:
    async with logged_in(site.servers[0].address, "disk", "busy-target"):
        refused = ctl(site, "vdisk", "set", "disk", "--maintenance", "on", check=False)
        assert refused.returncode == 2
        assert "busy-target" in refused.stderr and "--force" in refused.stderr
        ctl(site, "vdisk", "set", "disk", "--maintenance", "on", "--force")
    with pytest.raises(LoginError) as cut:
        async with logged_in(site.servers[0].address, "disk", "ordinary"):
            pass
    assert "maintenance" in cut.value.message
    ctl(site, "vdisk", "set", "disk", "--maintenance", "off")
    assert await version_of(site, "ordinary") == 1
