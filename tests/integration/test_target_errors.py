"""pvs-target's failures as a user meets them: the real command, one line on stderr, exit 2,
never a traceback; and one attached target per socket path (issue 13)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PYTHON, Pvsd, Servers, free_port, make_vdisk, pvs_target

from pvs_target.__main__ import build_parser, main
from pvs_target.sockets import Holder, SocketClaim, SocketInUse, identity, unlink_if_ours

ATTACH_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The run failed the way a user should see it: exit 2 and one line on stderr."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pvs-target: error: "), lines[0]
    return lines[0]


def refused_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    return free_port("127.0.0.1", span=1)


@pytest.fixture(scope="module")
def server(module_servers: Servers) -> Pvsd:
    store = module_servers.workdir / "store"
    make_vdisk(store, "disk", 1 << 20, seed=None)
    return module_servers("pvs1", store, vdisks=["disk"])


@pytest.fixture
def sockets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short directory: unix socket paths are limited to 107 bytes."""
    return tmp_path_factory.mktemp("s")


class Attached:
    def __init__(self, process: subprocess.Popen[str], ready: dict[str, object]) -> None:
        self.process = process
        self.ready = ready
        self.stderr = ""
        """What it wrote to stderr, once it has stopped."""


@contextlib.contextmanager
def attached(server: Pvsd, control: Path, *extra: str, device: str = "first") -> Iterator[Attached]:
    """A running ``pvs-target attach``, stopped (SIGTERM) at the end, whatever happens."""
    process = subprocess.Popen(
        [PYTHON, "-m", "pvs_target", "attach", "--server", server.address, "--vdisk", "disk",
         "--device-id", device, "--control", str(control), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    target = Attached(process, {})
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], ATTACH_TIMEOUT)
        assert ready, f"pvs-target attach did not attach within {ATTACH_TIMEOUT:g} s"
        line = process.stdout.readline()
        assert line, "pvs-target attach ended before it attached"
        target.ready = json.loads(line)
        assert target.ready["event"] == "attached", line
        yield target
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            target.stderr = process.communicate(timeout=STOP_TIMEOUT)[1]
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise AssertionError("pvs-target attach did not stop on SIGTERM") from None


def status(control: Path) -> dict[str, object]:
    result = pvs_target("status", "--control", str(control), "--json", timeout=20)
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


# -- the command line -----------------------------------------------------------------------


def test_version() -> None:
    result = pvs_target("--version", timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pvs-target (pvs) "), result.stdout
    version = result.stdout.split()[-1]
    assert version[0].isdigit() or version == "unknown", result.stdout


def test_every_option_has_help() -> None:
    """What ``--help`` and the man page show: no option left unexplained."""
    parser = build_parser()
    commands = [
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ]
    parsers = [parser, *commands[0].choices.values()]
    for each in parsers:
        for action in each._actions:
            if action.option_strings:
                assert action.help, f"{each.prog} {action.option_strings[0]} has no help"
    assert "powers of 1024" in (parsers[0].epilog or "")


def test_sizes_mean_what_they_mean_in_pvsctl() -> None:
    args = build_parser().parse_args(
        ["attach", "--server", "pvs1", "--vdisk", "d", "--cache-size", "10GB",
         "--cache-ram", "1G", "--nbd", "nbd://127.0.0.1/d"]
    )
    assert args.cache_size == 10 * 1000**3
    assert args.cache_ram == 1 << 30
    assert args.server == ["pvs1:6910"]
    assert str(args.nbd) == "127.0.0.1:10809"


@pytest.mark.parametrize(
    ("argument", "complaint"),
    [
        (["--server", "pvs 1"], "not a valid host name"),
        (["--server", "pvs1:0"], "outside 1-65535"),
        (["--nbd", "nbds://127.0.0.1/disk"], "TLS is not supported"),
        (["--cache-size", "10Q"], "powers of 1000"),
        (["--cache-size", "0"], "0 bytes"),
    ],
)
def test_bad_arguments_are_usage_errors(
    argument: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process, through the command's own ``main`` (a process each would be slow)."""
    with pytest.raises(SystemExit) as exit_request:
        main(["attach", "--server", "127.0.0.1:1", "--vdisk", "disk", *argument])
    assert exit_request.value.code == 2
    stderr = capsys.readouterr().err
    assert complaint in stderr.splitlines()[-1], stderr


def test_a_usage_error_from_the_real_command() -> None:
    result = pvs_target("attach", "--server", "127.0.0.1:1", "--vdisk", "disk",
                        "--cache-size", "10 GBs", timeout=20)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("pvs-target attach: error: argument --cache-size: size '10 GBs'"), last


# -- failures before attaching --------------------------------------------------------------


def test_no_server_gives_up_with_one_line(sockets: Path) -> None:
    port = refused_port()
    result = pvs_target("attach", "--server", f"127.0.0.1:{port}", "--vdisk", "disk",
                        "--control", str(sockets / "c.sock"), "--give-up-after", "1", timeout=30)
    line = one_error_line(result)
    assert "--give-up-after 1 s" in line and f"127.0.0.1:{port}" in line, line
    assert "connection refused" in line, line
    assert not list(sockets.iterdir()), "nothing is left behind"


def test_read_with_no_server(sockets: Path) -> None:
    result = pvs_target("read", "--server", f"127.0.0.1:{refused_port()}", "--vdisk", "disk",
                        "--give-up-after", "1", "-q", timeout=30)
    assert "check that pvsd runs" in one_error_line(result)


def test_nbd_port_taken(sockets: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for form in (f"127.0.0.1:{port}", f"nbd://127.0.0.1:{port}/disk"):
            result = pvs_target("attach", "--server", f"127.0.0.1:{refused_port()}",
                                "--vdisk", "disk", "--control", str(sockets / "c.sock"),
                                "--nbd", form, timeout=30)
            line = one_error_line(result)
            assert f"--nbd 127.0.0.1:{port}: cannot listen there: address already in use" in line


def test_nbd_export_name_must_be_the_vdisk(sockets: Path) -> None:
    result = pvs_target("attach", "--server", "127.0.0.1:1", "--vdisk", "disk",
                        "--control", str(sockets / "c.sock"), "--nbd", "nbd://127.0.0.1:0/other",
                        timeout=30)
    assert "write nbd://127.0.0.1:0/disk" in one_error_line(result)


@pytest.mark.parametrize("where", ["parent-is-a-file", "path-is-a-file", "cache-dir"])
def test_unusable_paths(sockets: Path, where: str) -> None:
    plain = sockets / "plain"
    plain.write_text("not a directory, not a socket\n")
    control = {"parent-is-a-file": plain / "c.sock", "path-is-a-file": plain}.get(
        where, sockets / "c.sock"
    )
    extra = ["--cache-dir", str(sockets / "missing")] if where == "cache-dir" else []
    result = pvs_target("attach", "--server", f"127.0.0.1:{refused_port()}", "--vdisk", "disk",
                        "--control", str(control), "--give-up-after", "1", *extra, timeout=30)
    line = one_error_line(result)
    if where == "cache-dir":
        assert "--cache-dir" in line and "create it" in line, line
    else:
        assert f"--control {control}" in line, line
    assert plain.read_text() == "not a directory, not a socket\n"


def test_unknown_vdisk(server: Pvsd, sockets: Path) -> None:
    result = pvs_target("attach", "--server", server.address, "--vdisk", "nosuch",
                        "--control", str(sockets / "c.sock"), timeout=30)
    line = one_error_line(result)
    assert "UNKNOWN_VDISK" in line and "check the vDisk name" in line, line


# -- one target per socket path --------------------------------------------------------------


def test_a_second_attach_on_the_same_sockets_is_refused(server: Pvsd, sockets: Path) -> None:
    control, nbd = sockets / "c.sock", sockets / "nbd.sock"
    with attached(server, control, "--nbd", f"unix:{nbd}") as first:
        assert first.ready["nbd"] == f"unix:{nbd}"
        assert first.ready["nbd_uri"] == f"nbd+unix:///disk?socket={nbd}"
        before = control.stat().st_ino, nbd.stat().st_ino
        for other in (["--control", str(control)],
                      ["--control", str(sockets / "other.sock"), "--nbd", f"unix:{nbd}"]):
            result = pvs_target("attach", "--server", server.address, "--vdisk", "disk",
                                "--device-id", "second", *other, timeout=30)
            line = one_error_line(result)
            assert "is in use by the pvs-target attached to vDisk 'disk' as device 'first'" \
                in line, line
            assert f"(pid {first.process.pid})" in line, line
        assert (control.stat().st_ino, nbd.stat().st_ino) == before, "the sockets are untouched"
        assert status(control)["device_id"] == "first"
    assert first.process.returncode == 0, first.stderr
    assert sorted(os.listdir(sockets)) == [], "the first target cleaned up after itself only"


def test_a_stale_socket_is_replaced(server: Pvsd, sockets: Path) -> None:
    control = sockets / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(control))
    stale.close()  # left behind, as by a target that crashed
    with attached(server, control):
        assert status(control)["device_id"] == "first"


def test_a_socket_someone_listens_on_is_not_taken(sockets: Path) -> None:
    """A listener that holds no lock (another program, or a target from before lock files)."""
    control = sockets / "c.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(control))
        listener.listen()
        started = time.monotonic()
        result = pvs_target("attach", "--server", f"127.0.0.1:{refused_port()}",
                            "--vdisk", "disk", "--control", str(control), timeout=30)
        line = one_error_line(result)
        assert "in use by a process that is listening on it" in line, line
        assert time.monotonic() - started < 25
        assert control.is_socket()


# -- the claims themselves, in this process ---------------------------------------------------


def test_a_claim_is_exclusive_and_leaves_nothing_behind(sockets: Path) -> None:
    path = str(sockets / "c.sock")
    holder = Holder(os.getpid(), "disk", "me")
    claim = SocketClaim.acquire(path, "--control", holder)
    try:
        with pytest.raises(SocketInUse, match=r"as device 'me' \(pid \d+\)"):
            SocketClaim.acquire(path, "--control", Holder(1, "other", "you"))
    finally:
        claim.release()
    claim.release()  # twice is harmless
    assert not list(sockets.iterdir())
    SocketClaim.acquire(path, "--control", holder).release()  # free again


def test_unlink_if_ours_leaves_another_socket_alone(sockets: Path) -> None:
    path = sockets / "c.sock"
    with socket.socket(socket.AF_UNIX) as ours, socket.socket(socket.AF_UNIX) as theirs:
        ours.bind(str(path))
        mine = identity(str(path))
        path.unlink()  # replaced behind our back, by another process's socket
        theirs.bind(str(path))
        assert not unlink_if_ours(str(path), mine)
        assert path.is_socket()
        assert unlink_if_ours(str(path), identity(str(path)))
        assert not path.exists()
