"""A site of pvsd processes for integration tests: replicated vDisk, keys, peers, helpers."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness import PYTHON, Pvsd, make_vdisk, random_bytes

MIB = 1 << 20
SIZE = 16 * MIB


class Site:
    """Three servers holding identical replicas (cp -p) of vDisk ``disk``."""

    def __init__(
        self, workdir: Path, count: int = 3, powers: tuple[float, ...] = (), **properties: str
    ) -> None:
        self.workdir = workdir
        self.key = workdir / "site.key"
        self.key.write_text(keygen())
        first = workdir / "store1"
        make_vdisk(first, "disk", SIZE, seed=7)
        if properties:
            args = [f"--{k.replace('_', '-')}={v}" for k, v in properties.items()]
            pvsctl("vdisk", "set", "disk", "--store", str(first), *args)
        self.data = random_bytes(SIZE, 7)
        self._replicate_and_join(
            count, lambda index: ["--power", str(powers[index] if index < len(powers) else 1.0)]
        )

    def _replicate_and_join(self, count: int, own: Callable[[int], list[str]]) -> None:
        """Copy store1's vDisk files (not its identity cache) to store2..N, and give each
        server the site key, its peers, an admin API and ``own(index)`` arguments."""
        first = self.workdir / "store1"
        for index in range(2, count + 1):
            store = self.workdir / f"store{index}"
            store.mkdir()
            for file in first.glob("disk.*"):
                if not file.name.endswith(".identity.json"):
                    shutil.copy2(file, store / file.name)
        self.servers = [
            Pvsd(f"s{i}", self.workdir / f"store{i}", self.workdir) for i in range(1, count + 1)
        ]
        for index, server in enumerate(self.servers):
            peers = [p.address for p in self.servers if p is not server]
            server.args = [
                *own(index),
                "--key-file", str(self.key), "--peer-timeout", "2", "--drain-timeout", "5",
                "--admin", f"{server.host}:{server.port + 1}",
                *[arg for peer in peers for arg in ("--peer", peer)],
            ]

    def start(self) -> None:
        for server in self.servers:
            server.start(vdisks=["disk"])
        for server in self.servers:  # every server has heard every other
            for other in self.servers:
                if other is not server:
                    server.wait_for_log("peer_inventory", peer=other.name)

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
            server.kill()

    def by_name(self, name: str) -> Pvsd:
        return next(s for s in self.servers if s.name == name)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]


def keygen() -> str:
    return secrets.token_hex(32) + "\n"  # what 'pvsctl site keygen' writes


def pvsctl(*args: str) -> str:
    result = subprocess.run(
        [PYTHON, "-m", "pvsd.ctl", *args], capture_output=True, text=True, timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def stop_async(server: Pvsd, timeout: float = 20) -> None:
    """SIGTERM and wait without blocking the event loop: the targets in this process must
    go on running (and move away) while their server drains."""
    server.signal(signal.SIGTERM)
    await until(lambda: not server.alive(), timeout, f"{server.name} to exit")
    assert server.wait() == 0


@contextlib.contextmanager
def running_site(workdir: Path, **options: object) -> Iterator[Site]:
    """A started site, stopped on the way out whatever happened."""
    built = Site(workdir, **options)  # type: ignore[arg-type]
    try:
        built.start()
        yield built
    finally:
        built.stop()


def restart(server: Pvsd) -> None:
    server.process = None
    server.start(vdisks=["disk"])


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def private_site(
    workdir: Path, *, size: int = 4 * MIB, config: str = "", peer_timeout: float = 1.5
) -> Iterator[tuple[Path, list[Pvsd]]]:
    """Two servers over one shared store holding Private Image vDisk ``priv``; ``config``
    is extra pvsd TOML (e.g. a shorter inventory interval)."""
    shared = workdir / "shared"
    make_vdisk(shared, "priv", size, seed=3)
    pvsctl("vdisk", "set", "priv", "--store", str(shared), "--mode", "private")
    key = workdir / "site.key"
    key.write_text(keygen())
    options: list[str] = []
    if config:
        (workdir / "pvsd.toml").write_text(config)
        options = ["--config", str(workdir / "pvsd.toml")]
    servers = [Pvsd(f"p{i}", [], workdir) for i in (1, 2)]
    for server in servers:
        other = next(s for s in servers if s is not server)
        server.args = [*options, "--shared-store", str(shared), "--key-file", str(key),
                       "--peer", other.address, "--peer-timeout", str(peer_timeout),
                       "--admin", "off"]
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
