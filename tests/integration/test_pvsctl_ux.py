"""pvsctl as an administrator meets it: --version, quick listings, progress and Ctrl-C, clean
stderr, and tables that are wrapped on a terminal and never cut, whole in a pipe.

Real ``python -m pvsd.ctl`` processes on real (sparse) files; one real pvsd for the site table.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import pty
import re
import secrets
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

from harness import Servers, random_bytes

PYTHON = sys.executable
TIB = 1 << 40
MIB = 1 << 20
LONG_NAME = "pvs-server-with-a-rather-long-name-01"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'pvsd.ctl', *sys.argv[1:]])"
)


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without pvsctl's own variables or a width."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVS_") and k != "COLUMNS"}
    return {**env, **extra}


def pvsctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PYTHON, "-m", "pvsd.ctl", *args], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env=environment(**env), check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def listing(directory: Path) -> list[tuple[str, int, int]]:
    """Every file (hidden ones too) with its size and mtime: what a command changed."""
    return sorted(
        (path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in directory.iterdir()
    )


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    return path


# -- --version, -v, one-line warnings --------------------------------------------------------


def test_every_program_tells_the_installed_version() -> None:
    version = importlib.metadata.version("pvs")
    for program, module in (("pvsctl", "pvsd.ctl"), ("pvsd", "pvsd"), ("pvs-target", "pvs_target")):
        result = subprocess.run(
            [PYTHON, "-m", module, "--version"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, env=environment(), check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{program} (pvs) {version}\n"


def test_local_commands_print_results_not_internal_log_lines(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    source = tmp_path / "disk.raw"
    source.write_bytes(random_bytes(2 * MIB, seed=3))
    runs = [
        pvsctl("vdisk", "create", "blank", "--size", "4M", "--store", str(store)),
        pvsctl("vdisk", "import", str(source), "--name", "disk", "--store", str(store)),
        pvsctl("vdisk", "manifest", "disk", "--store", str(store)),
        pvsctl("vdisk", "verify", "disk", "--store", str(store)),
        pvsctl("vdisk", "show", "--store", str(store)),
    ]
    for result in runs:  # results only: no event names, levels or timestamps on stderr
        assert result.returncode == 0, result.args
        assert result.stderr == "", (result.args, result.stderr)
    verbose = pvsctl("vdisk", "manifest", "disk", "--store", str(store), "-v")
    assert verbose.returncode == 0
    assert "pvsctl: info: manifest_started (" in verbose.stderr, verbose.stderr

    (store / "bad name.img").write_bytes(b"")  # refused by name: a warning, on one line
    shown = pvsctl("vdisk", "show", "--store", str(store))
    assert shown.returncode == 0, shown.stderr
    [warning] = shown.stderr.splitlines()
    assert warning.startswith("pvsctl: warning: vdisk_refused (") and "rename the file" in warning


# -- show: instant, whatever the size --------------------------------------------------------


def test_show_of_a_2_tib_sparse_image_reads_no_image(tmp_path: Path) -> None:
    """A new 2 TiB image takes minutes to hash: show must neither hash it (to make a manifest
    or to check one) nor write anything, and says how to make the missing manifest."""
    store = tmp_path / "store"
    store.mkdir()
    sparse(store / "raw.img", 2 * TIB)  # copied in without a manifest
    made = pvsctl("vdisk", "create", "big", "--size", "2T", "--block-size", "1M",
                  "--store", str(store))
    assert made.returncode == 0, made.stderr
    before = listing(store)

    started = time.monotonic()
    shown = pvsctl("vdisk", "show", "--store", str(store))
    took = time.monotonic() - started
    assert shown.returncode == 0, shown.stderr
    assert took < 30, f"show took {took:.1f} s: hashing 2 TiB at 70 GB/s is not possible here"
    assert listing(store) == before, "show wrote something"
    rows = {line.split()[1]: line for line in shown.stdout.splitlines() if "2.0 TiB" in line}
    assert "none yet" in rows["raw"], shown.stdout
    assert "1024 KiB blocks" in rows["big"] and "not yet (pvsctl vdisk verify)" in rows["big"]
    assert f"raw: no manifest yet; make one with `pvsctl vdisk manifest raw --store {store}`" in (
        shown.stdout
    )

    listed = pvsctl("vdisk", "show", "--json", "--store", str(store))
    assert listed.returncode == 0, listed.stderr
    by_name = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    assert by_name["raw"]["manifest"] is None and by_name["raw"]["identity"] is None
    assert by_name["raw"]["manifest_problem"].startswith("no manifest yet")
    assert by_name["big"]["manifest"]["block_size"] == MIB and not by_name["big"]["verified"]
    assert by_name["big"]["identity"]["version"] == 1
    assert listing(store) == before


def test_show_tells_a_checked_copy_from_a_changed_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    assert pvsctl("vdisk", "create", "small", "--size", "1M", "--store", str(store)).returncode == 0
    assert "not yet" in pvsctl("vdisk", "show", "small", "--store", str(store)).stdout
    assert pvsctl("vdisk", "verify", "small", "--store", str(store)).returncode == 0
    assert "matches its manifest" in pvsctl("vdisk", "show", "small", "--store", str(store)).stdout
    with (store / "small.img").open("r+b") as image:
        image.write(b"x")
    changed = pvsctl("vdisk", "show", "small", "--store", str(store))
    assert "not since it changed" in changed.stdout, changed.stdout


def test_create_writes_the_manifest_of_zeros_without_holding_it(tmp_path: Path) -> None:
    """The manifest of a sparse image is written level by level (4 GiB for 2 TiB of 16 KiB
    blocks); every odd size must give the exact tree a full pass would."""
    from pvs_protocol.manifest import Manifest, leaf_digest

    store = tmp_path / "store"
    store.mkdir()
    block = 4096
    for index, size in enumerate((512, block, 129 * block + 512, 128 * 128 * block + 3 * 512)):
        name = f"z{index}"
        made = pvsctl("vdisk", "create", name, "--size", str(size), "--block-size", "4K",
                      "--store", str(store))
        assert made.returncode == 0, made.stderr
        manifest = Manifest.decode((store / f"{name}.manifest").read_bytes())  # checks the tree
        assert (manifest.size, manifest.block_size) == (size, block)
        full, rest = divmod(size, block)
        expected = leaf_digest(bytes(block)) * full + (leaf_digest(bytes(rest)) if rest else b"")
        assert manifest.levels[0] == expected, size
        assert f"root {manifest.root.hex()}" in made.stdout


# -- Ctrl-C ------------------------------------------------------------------------------------


@contextlib.contextmanager
def interruptible(*args: str) -> Iterator[subprocess.Popen[str]]:
    """pvsctl with SIGINT at its default: a test run started in the background by a shell
    inherits SIGINT ignored, and Python would then never raise KeyboardInterrupt."""
    process = subprocess.Popen(
        [PYTHON, "-c", _DEFAULT_SIGINT, *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=environment(),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


def test_ctrl_c_stops_a_long_pass_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    sparse(store / "huge.img", 2 * TIB)
    before = listing(store)
    for args in (("vdisk", "manifest", "huge"), ("vdisk", "create", "other", "--size", "2T")):
        with interruptible(*args, "--store", str(store)) as process:
            assert process.stderr is not None
            first = process.stderr.readline()  # the pass has started: stderr says so at once
            assert ": started, " in first, first
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        assert process.returncode == 130, (args, out, err)
        assert "Traceback" not in err and err.strip() == "pvsctl: interrupted", (args, err)
        assert out == ""
        assert listing(store) == before, f"{args} left {listing(store)}"


# -- tables ------------------------------------------------------------------------------------


def test_tables_in_a_pipe_are_whole(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    description = "[gold] " + "a description far wider than any terminal " * 4
    made = pvsctl("vdisk", "create", "wide", "--size", "1M", "--store", str(store),
                  "--description", description.strip())
    assert made.returncode == 0, made.stderr
    for width in ({}, {"COLUMNS": "80"}):  # a width meant for a terminal does not cut a pipe
        shown = pvsctl("vdisk", "show", "--store", str(store), **width)
        assert shown.returncode == 0, shown.stderr
        [row] = [line for line in shown.stdout.splitlines() if "wide" in line]
        assert description.strip() in row and "…" not in shown.stdout, shown.stdout


def test_site_tables_wrap_on_a_terminal_and_stay_whole_in_a_pipe(pvsd_factory: Servers) -> None:
    key = pvsd_factory.workdir / "site.key"
    key.write_text(secrets.token_hex(32) + "\n")
    key.chmod(0o600)
    server = pvsd_factory(LONG_NAME, start=False)
    admin = f"{server.host}:{server.port + 1}"
    server.args = ["--key-file", str(key), "--admin", admin]
    server.start()
    server.wait_for_log("admin_listening")
    command = ("servers", "--admin", admin, "--key-file", str(key))

    piped = pvsctl(*command)
    assert piped.returncode == 0, piped.stderr
    [row] = [line for line in piped.stdout.splitlines() if LONG_NAME in line]
    assert server.address in row and admin in row and "…" not in piped.stdout

    screen = on_terminal(command, columns=60)
    assert "…" not in screen, screen
    lines = [_ANSI.sub("", line) for line in screen.splitlines()]
    assert all(len(line) <= 60 for line in lines), screen
    cells = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert LONG_NAME in "".join(cells).replace(" ", ""), screen  # folded, not cut


def on_terminal(args: tuple[str, ...], *, columns: int) -> str:
    """Run pvsctl with its stdout on a pseudo-terminal ``columns`` wide; what it showed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [PYTHON, "-m", "pvsd.ctl", *args], stdout=follower, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=environment(TERM="xterm"),
    )
    os.close(follower)
    output = bytearray()
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last holder closed it
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return output.decode("utf-8", "replace").replace("\r\n", "\n")
