"""Private Image on shared storage: one writer across the site, writes durable on flush."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Pvsd, image_path, manifest_identity, random_bytes
from sites import private_site

from pvs_protocol.errors import ErrorCode
from pvs_target.login import LoginError, Session, login

MIB = 1 << 20


async def login_once_free(server: str, device: str, *, direct: bool = False) -> Session:
    """Log in as the next writer, retrying BUSY as a target does: the previous writer's
    server releases its lock when it has handled that writer's goodbye, which on a loaded
    machine may come a moment after the writer closed its side."""
    for _ in range(100):
        try:
            return await login([server], "priv", device, connect_timeout=2, direct=direct)
        except LoginError as error:
            if error.code is not ErrorCode.BUSY:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError(f"{device}: the lock was still held after 100 tries")


@pytest.fixture
def shared_site(tmp_path: Path) -> Iterator[tuple[Path, list[Pvsd]]]:
    with private_site(tmp_path) as site:
        yield site


async def test_one_writer_at_a_time_across_the_site(
    shared_site: tuple[Path, list[Pvsd]],
) -> None:
    shared, (s1, s2) = shared_site
    async with asyncio.timeout(60):
        first = await login([s1.address], "priv", "writer-a", connect_timeout=2)
        assert not first.read_only
        await first.connection.write(MIB, b"\x5a" * 4096)
        await first.connection.flush()
        on_disk = image_path(shared, "priv").read_bytes()
        assert on_disk[MIB : MIB + 4096] == b"\x5a" * 4096, "FLUSH returned before the data"
        assert on_disk[:MIB] == random_bytes(4 * MIB, 3)[:MIB]

        for server in (s1, s2):  # refused everywhere, with a message naming the writer
            with pytest.raises(LoginError) as refused:
                await login([server.address], "priv", "writer-b", connect_timeout=2)
            assert refused.value.code is ErrorCode.BUSY
            assert "writer-a" in refused.value.message

        await first.close()
        second = await login_once_free(s2.address, "writer-b")
        assert await second.connection.read(MIB, 4096) == b"\x5a" * 4096
        # the writer's server dies: once the site declares it down, its lock is released
        streaming = s1 if second.server_name == s1.name else s2
        survivor = s2 if streaming is s1 else s1
        streaming.kill()
        await survivor.until_log("lock_released_for_down_server", timeout=15, server=streaming.name)
        third = await login([survivor.address], "priv", "writer-c", connect_timeout=2)
        await third.connection.write(0, b"c" * 512)
        await third.connection.flush()
        assert image_path(shared, "priv").read_bytes()[:512] == b"c" * 512
        await third.close()
        await second.connection.close()


async def test_writers_through_either_server_keep_one_whole_manifest(
    shared_site: tuple[Path, list[Pvsd]],
) -> None:
    """Writers take turns through both servers of a shared store, each server with the
    manifest it loaded before the other's writes: the manifest on disk stays a whole tree
    that matches the image (both servers publish it), and after the last writer's server
    dies the survivor takes a writer at once, without waiting for any pass."""
    shared, (s1, s2) = shared_site
    async with asyncio.timeout(60):
        first = await login([s1.address], "priv", "writer-a", connect_timeout=2, direct=True)
        await first.connection.write(0, b"a" * 4096)  # a block of the first page of digests
        await first.connection.flush()
        await first.close()
        second = await login_once_free(s2.address, "writer-b", direct=True)
        assert second.server_name == s2.name
        await second.connection.write(3 * MIB, b"b" * 4096)  # one of the second page
        await second.connection.flush()
        written = manifest_identity(shared, "priv")  # the tree follows from the image's bytes
        await s1.until_log("identity_published", vdisk="priv", identity=written.short)

        s2.kill()
        await s1.until_log("lock_released_for_down_server", timeout=15, server=s2.name)
        third = await login([s1.address], "priv", "writer-c", connect_timeout=2, direct=True)
        assert await third.connection.read(0, 4096) == b"a" * 4096
        assert await third.connection.read(3 * MIB, 4096) == b"b" * 4096
        await third.connection.write(2 * MIB, b"c" * 4096)
        await third.connection.flush()
        assert manifest_identity(shared, "priv").short != written.short
        await third.close()
        await second.connection.close()
    assert not s1.trouble()
