"""Private Image on shared storage: one writer across the site, writes durable on flush."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PYTHON, Pvsd, image_path, make_vdisk, random_bytes

from pvs_protocol.errors import ErrorCode
from pvs_target.login import LoginError, login

MIB = 1 << 20


def _pvsctl(*args: str) -> None:
    subprocess.run([PYTHON, "-m", "pvsd.ctl", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def shared_site(tmp_path: Path) -> Iterator[tuple[Path, list[Pvsd]]]:
    shared = tmp_path / "shared"
    make_vdisk(shared, "priv", 4 * MIB, seed=3)
    _pvsctl("vdisk", "set", "priv", "--store", str(shared), "--mode", "private")
    key = tmp_path / "site.key"
    key.write_text(secrets.token_hex(32))
    servers = [Pvsd(f"s{i}", [], tmp_path) for i in (1, 2)]
    for server in servers:
        other = next(s for s in servers if s is not server)
        server.args = ["--shared-store", str(shared), "--key-file", str(key),
                       "--peer", other.address, "--peer-timeout", "1.5", "--admin", "off"]
    try:
        for server in servers:
            server.start(vdisks=["priv"])
        for server in servers:
            other = next(s for s in servers if s is not server)
            server.wait_for_log("peer_inventory", peer=other.name)
        yield shared, servers
    finally:
        for server in servers:
            try:
                server.stop()
            finally:
                server.kill()


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
