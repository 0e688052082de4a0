"""What a diskless machine asks of pvs-target (issue 14), with the real command against a real
pvsd: ``attach --pin`` streams exactly the version its kernel came from, even when a newer one
is in production; a pin no server holds ends in one line; ``attach --root-storage`` runs as
``@pvs-target``, is spared by the OOM killer, and outlives SIGTERM; and ``pvs_target.runtime``
refuses to list an editable install, whose modules its record does not name.

One pvsd (a site of one, for its admin API) holds vDisk ``disk`` in two production versions:
1, the imported bytes, and 2, whose first bytes the maintenance device changed. Every
``pvs-target`` started here is ended by its own PID in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import PYTHON, logged_in, manifest_identity, pvs_target
from sites import Site, pvsctl

from pvs_protocol.identity import ReplicaIdentity
from pvs_target.failover import FailoverSettings, VDiskStream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "external"))

from nbd_tools import need, run

MIB = 1 << 20
CHANGE = b"version two " * 100
"""What the maintenance device writes at offset 0 of version 2."""
ATTACH_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parents[2]
CAP_SYS_RESOURCE = 24


class Versions:
    """The running site and what each version of ``disk`` holds."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.server = site.servers[0]
        store = site.workdir / "store1"
        self.one = manifest_identity(store, "disk")
        self.two = manifest_identity(store, "disk@2")
        self.data_one = site.data
        self.data_two = CHANGE + site.data[len(CHANGE):]


def ctl(site: Site, *args: str) -> str:
    server = site.servers[0]
    return pvsctl(*args, "--admin", f"{server.host}:{server.port + 1}",
                  "--key-file", str(site.key))


async def write_version_two(site: Site) -> None:
    async with logged_in(site.servers[0].address, "disk", "admin-pc") as writer:
        assert writer.identity.version == 2 and not writer.read_only
        await writer.connection.write(0, CHANGE)
        await writer.connection.flush()


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Versions]:
    site = Site(tmp_path_factory.mktemp("site"), count=1, maintenance_devices="admin-pc")
    try:
        site.start()
        ctl(site, "vdisk", "version", "new", "disk")
        asyncio.run(write_version_two(site))
        ctl(site, "vdisk", "version", "promote", "disk", "--to", "production")
        rows = {row["version"]: row for row in json.loads(
            ctl(site, "vdisk", "versions", "disk", "--json"))["versions"]}
        assert rows[1]["state"] == rows[2]["state"] == "production", rows
        assert not rows[2]["pending"], rows
        built = Versions(site)
        assert built.one.version == 1 and built.two.version == 2
        yield built
        for server in site.servers:
            assert not server.trouble(), server.trouble()
    finally:
        site.stop()


@pytest.fixture
def sockets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory: unix socket paths are limited to 107 bytes."""
    return tmp_path_factory.mktemp("s")


class Attached:
    def __init__(self, process: subprocess.Popen[str], stderr: Path, control: Path) -> None:
        self.process = process
        self.stderr_path = stderr
        self.control = control
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        result = pvs_target("status", "--control", str(self.control), "--json", timeout=20)
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer


@contextlib.contextmanager
def attached(
    versions: Versions, sockets: Path, device: str, *extra: str,
    stop: signal.Signals = signal.SIGTERM,
) -> Iterator[Attached]:
    """A running ``pvs-target attach``, ended by its PID with ``stop`` whatever happens
    (SIGKILL after STOP_TIMEOUT if it does not end)."""
    control = sockets / f"{device}.sock"
    stderr = sockets / f"{device}.log"
    with stderr.open("w") as log:
        process = subprocess.Popen(
            [PYTHON, "-m", "pvs_target", "attach", "--server", versions.server.address,
             "--vdisk", "disk", "--device-id", device, "--control", str(control), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
        )
    target = Attached(process, stderr, control)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], ATTACH_TIMEOUT)
        assert ready, f"not attached within {ATTACH_TIMEOUT:g} s\n{target.stderr()}"
        line = process.stdout.readline()
        assert line, f"pvs-target attach ended before it attached\n{target.stderr()}"
        target.ready = json.loads(line)
        assert target.ready["event"] == "attached", line
        yield target
    finally:
        end(process, stop)


def end(process: subprocess.Popen[str], stop: signal.Signals) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, stop)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
            raise AssertionError(f"pvs-target did not end on {stop.name}; killed it") from None
    if process.stdout is not None:
        process.stdout.close()


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return result


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pvs-target: error: "), lines[0]
    return lines[0]


# -- --pin ----------------------------------------------------------------------------------------


def test_without_a_pin_a_target_streams_the_newest_production_version(
    versions: Versions, sockets: Path,
) -> None:
    with attached(versions, sockets, "plain") as target:
        identity = ReplicaIdentity.from_json(target.status()["identity"])
        assert identity == versions.two


def test_a_pinned_target_streams_the_version_it_names(versions: Versions, sockets: Path) -> None:
    with attached(versions, sockets, "pinned", "--pin", versions.one.token()) as target:
        status = target.status()
        assert ReplicaIdentity.from_json(status["identity"]) == versions.one
        assert status["verification"]["enabled"], status["verification"]


def test_a_pinned_export_reads_the_bytes_of_that_version(
    versions: Versions, sockets: Path,
) -> None:
    need("nbdcopy")
    nbd = sockets / "nbd.sock"
    copy = sockets / "copy.img"
    with attached(versions, sockets, "reader", "--pin", versions.one.token(),
                  "--nbd", f"unix:{nbd}") as target:
        run("nbdcopy", target.ready["nbd_uri"], str(copy))
        assert target.status()["verification"]["mismatches"] == []
    assert copy.read_bytes() == versions.data_one


async def test_a_pinned_stream_reads_the_bytes_of_that_version(versions: Versions) -> None:
    """``VDiskStream(pin=...)``, in this process: the first login already asks for version 1."""
    settings = FailoverSettings(give_up_after=10)
    for pin, data in ((versions.one, versions.data_one), (versions.two, versions.data_two),
                      (None, versions.data_two)):
        stream = VDiskStream([versions.server.address], "disk", "in-process", settings=settings,
                             pin=pin)
        await stream.open()
        try:
            assert stream.identity == (pin or versions.two)
            assert await stream.read(0, MIB) == data[:MIB]
        finally:
            await stream.close()


def test_a_pin_no_server_holds_gives_up_in_one_line(versions: Versions, sockets: Path) -> None:
    one = versions.one
    nowhere = ReplicaIdentity(one.version, one.timestamp_ns, one.size, bytes(32), one.block_size)
    result = pvs_target("attach", "--server", versions.server.address, "--vdisk", "disk",
                        "--device-id", "lost", "--control", str(sockets / "c.sock"),
                        "--pin", nowhere.token(), "--give-up-after", "3", timeout=30)
    line = one_error_line(result)
    assert "--give-up-after 3 s" in line, line
    assert "identical replica" in line, line
    assert not (sockets / "c.sock").exists()


# -- --root-storage -------------------------------------------------------------------------------


def test_a_root_storage_target_outlives_sigterm(versions: Versions, sockets: Path) -> None:
    with attached(versions, sockets, "root", "--root-storage", "--pin", versions.one.token(),
                  stop=signal.SIGKILL) as target:
        pid = target.pid  # the same process: the exec kept its PID
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[0] == b"@pvs-target", argv
        assert b"--root-storage" in argv, argv
        oom_score_adj = Path(f"/proc/{pid}/oom_score_adj").read_text().strip()
        if may_protect():
            assert oom_score_adj == "-1000"
        else:  # a container's root without CAP_SYS_RESOURCE: said, not silently left out
            assert oom_score_adj == Path("/proc/self/oom_score_adj").read_text().strip()
            until(lambda: "oom_score_adj" in target.stderr(), 10, "the warning")
            assert "root_storage_unprotected" in target.stderr(), target.stderr()
        for count, signum in enumerate((signal.SIGTERM, signal.SIGINT), start=1):
            outlives(target, signum, count)
            status = target.status()
            assert ReplicaIdentity.from_json(status["identity"]) == versions.one
            assert status["state"] == "streaming", status
        assert "SIGTERM" in target.stderr() and "SIGINT" in target.stderr()
        assert "Traceback" not in target.stderr(), target.stderr()
    assert target.process.returncode == -signal.SIGKILL


def outlives(target: Attached, signum: signal.Signals, count: int) -> None:
    """Send ``signum``; it is logged as the ``count``-th ignored signal, and the target lives."""
    os.kill(target.pid, signum)
    until(lambda: target.stderr().count("root_storage_signal_ignored") >= count, 10,
          f"{signum.name} to be logged")
    assert target.process.poll() is None, target.stderr()


def may_protect() -> bool:
    """Whether this process (and so its child) may lower its OOM score: root with
    CAP_SYS_RESOURCE, which a container's root may lack."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return os.geteuid() == 0 and bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


# -- python -m pvs_target.runtime -----------------------------------------------------------------


def editable_install() -> bool:
    import importlib.metadata

    for distribution in importlib.metadata.distributions(name="pvs"):
        direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
        if direct_url.get("dir_info", {}).get("editable"):
            return True
    return False


@pytest.mark.skipif(not editable_install(), reason="pvs is not an editable install here")
@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_runtime_refuses_an_editable_install(where: str, tmp_path: Path) -> None:
    """From the checkout the modules and an egg-info sit in the working directory; elsewhere
    only pip's import hook knows them: neither may pass for a complete listing."""
    result = subprocess.run(
        [PYTHON, "-m", "pvs_target.runtime"], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False, cwd=ROOT if where == "checkout" else tmp_path,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pvs_target.runtime: error: ") and "editable" in lines[0], lines
