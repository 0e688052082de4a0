"""Damaged replicas on real pvsd processes: found, withdrawn, never served.

A replica whose bytes no longer match its manifest (``NAME.manifest``, copied with the image)
is damaged. Its server finds it (at start, when the image changes, or by the scrub), logs
``replica_damaged`` and advertises it as damaged; no target is given its bytes, whichever
server it logs in at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import Pvsd, logged_in, read_whole
from sites import SIZE, Site

BAD_OFFSET = 5 * 1024 * 1024 + 1000
BLOCK = 16384


def corrupt(image: Path, *, restore_mtime: bool, offset: int = BAD_OFFSET) -> None:
    """Change 16 bytes, as a failing disk or a careless hand would."""
    times = image.stat()
    with image.open("r+b") as file:
        file.seek(offset)
        old = file.read(16)
        file.seek(offset)
        file.write(bytes(b ^ 0x5A for b in old))
    if restore_mtime:
        os.utime(image, ns=(times.st_atime_ns, times.st_mtime_ns))


def start_with_damage(site: Site, damaged: Pvsd) -> None:
    for server in site.servers:
        if server is damaged:
            server.start()
            server.wait_for_log("replica_damaged", timeout=20, vdisk="disk")
        else:
            server.start(vdisks=["disk"])
    for server in site.servers:
        for other in site.servers:
            if other is not server:
                server.wait_for_log("peer_inventory", peer=other.name)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("restore_mtime", [True, False])
async def test_every_target_reads_the_good_copy(
    tmp_path: Path, count: int, restore_mtime: bool
) -> None:
    site = Site(tmp_path, count=count)
    assert (tmp_path / "store1" / "disk.manifest").exists()  # made by pvsctl import, copied
    corrupt(tmp_path / "store2" / "disk.img", restore_mtime=restore_mtime)
    damaged = site.servers[1]
    try:
        start_with_damage(site, damaged)
        [record] = damaged.find_logs("replica_damaged", vdisk="disk")
        assert record["first_bad_offset"] == BAD_OFFSET - BAD_OFFSET % BLOCK
        assert record["bad_blocks"] == 1 and record["found_by"] == "verify"
        assert "action" in record
        for index, server in enumerate(site.servers):
            async with logged_in(server.address, "disk", f"t{index}") as session:
                assert session.server_name != damaged.name
                assert await read_whole(session) == site.data
        assert not damaged.find_logs("target_logged_in")
    finally:
        site.stop()


async def test_a_replica_damaged_while_served_is_withdrawn(tmp_path: Path) -> None:
    site = Site(tmp_path, count=2)
    try:
        site.start()
        first = site.servers[0]
        corrupt(tmp_path / "store1" / "disk.img", restore_mtime=True)
        await first.until_log("replica_damaged", timeout=20, vdisk="disk")
        for server in site.servers:
            async with logged_in(server.address, "disk", f"later-{server.name}") as session:
                assert session.server_name == site.servers[1].name
                assert await read_whole(session) == site.data
    finally:
        site.stop()


async def test_scrub_finds_a_corrupted_idle_copy(tmp_path: Path) -> None:
    """Corruption below the file system changes no stat field; to stand for it, the watcher
    is made to look only once (--watch-interval 3600) so that only the scrub can notice."""
    site = Site(tmp_path, count=1)
    server = site.servers[0]
    server.args = [
        "--watch-interval", "3600", "--scrub-rate", "1e9", "--scrub-interval", "0.2",
        "--admin", "off",
    ]
    try:
        server.start(vdisks=["disk"])
        await server.until_log("scrub_clean", timeout=20, vdisk="disk")
        corrupt(tmp_path / "store1" / "disk.img", restore_mtime=True, offset=SIZE - 3)
        await server.until_log("replica_damaged", timeout=20, vdisk="disk", found_by="scrub")
        # the first report comes at the first mismatch; the count follows the whole pass
        await server.until_log("replica_damaged", timeout=20, vdisk="disk", complete=True)
        [record] = server.find_logs("replica_damaged", vdisk="disk", complete=True)
        assert record["first_bad_offset"] == SIZE - BLOCK and record["bad_blocks"] == 1
        with pytest.raises(Exception, match=r"damaged|NO_IDENTICAL_REPLICA|no replica"):
            async with logged_in(server.address, "disk", "too-late"):
                pass
    finally:
        site.stop()
