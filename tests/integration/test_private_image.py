"""Private Image on shared storage: one writer across the site, writes durable on flush."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Pvsd, image_path, random_bytes
from sites import private_site

from pvs_protocol.errors import ErrorCode
from pvs_target.login import LoginError, login

MIB = 1 << 20


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
        second = await login([s2.address], "priv", "writer-b", connect_timeout=2)
        assert await second.connection.read(MIB, 4096) == b"\x5a" * 4096
        # the writer's server dies: once the site declares it down, its lock is released
        streaming = s1 if second.server_name == "s1" else s2
        survivor = s2 if streaming is s1 else s1
        streaming.kill()
        await survivor.until_log("lock_released_for_down_server", timeout=15, server=streaming.name)
        third = await login([survivor.address], "priv", "writer-c", connect_timeout=2)
        await third.connection.write(0, b"c" * 512)
        await third.connection.flush()
        assert image_path(shared, "priv").read_bytes()[:512] == b"c" * 512
        await third.close()
        await second.connection.close()
