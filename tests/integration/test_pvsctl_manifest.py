"""pvsctl and manifests in a local store: create, import, verify, make again, re-stamp, show.

Real files and real ``python -m pvsd.ctl`` processes; no pvsd is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from harness import random_bytes

from pvs_protocol.manifest import Manifest

BLOCK = 16384


def pvsctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "250", **(env or {})}
    if env is None:
        environment.pop("PVS_STORE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", *args], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=environment, check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def manifest_of(store: Path, name: str) -> Manifest:
    return Manifest.decode((store / f"{name}.manifest").read_bytes())


def root_printed(output: str) -> str:
    match = re.search(r"root ([0-9a-f]{64})", output)
    assert match, output
    return match[1]


def flip(image: Path, offset: int) -> None:
    with image.open("r+b") as file:
        file.seek(offset)
        old = file.read(1)
        file.seek(offset)
        file.write(bytes([old[0] ^ 0xFF]))


def test_create_verify_damage_and_make_a_new_version(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    created = pvsctl("vdisk", "create", "disk", "--size", "1M", "--store", str(store))
    assert created.returncode == 0, created.stderr
    manifest = manifest_of(store, "disk")
    assert root_printed(created.stdout) == manifest.root.hex()
    assert (manifest.version, manifest.size, manifest.block_size) == (1, 1 << 20, BLOCK)

    good = pvsctl("vdisk", "verify", "disk", "--store", str(store))
    assert good.returncode == 0, good.stderr
    assert "good" in good.stdout and f"all {(1 << 20) // BLOCK} blocks" in good.stdout

    image = store / "disk.img"
    flip(image, 5 * BLOCK + 100)
    flip(image, 9 * BLOCK)
    bad = pvsctl("vdisk", "verify", "disk", "--store", str(store))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"first bad block 5 at offset {5 * BLOCK}" in bad.stdout, bad.stdout
    assert "2 of 64 blocks" in bad.stdout, bad.stdout
    assert "copy disk.img and disk.manifest" in bad.stderr  # and what to do about it

    remade = pvsctl("vdisk", "manifest", "disk", "--store", str(store))
    assert remade.returncode == 0, remade.stderr
    new = manifest_of(store, "disk")
    assert root_printed(remade.stdout) == new.root.hex() != manifest.root.hex()
    assert new.created_ns > manifest.created_ns and new.version == manifest.version
    again = pvsctl("vdisk", "verify", "disk", "--store", str(store))
    assert again.returncode == 0, again.stdout + again.stderr


def test_set_version_restamps_the_same_digests_as_a_new_identity(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    source = tmp_path / "source.raw"
    source.write_bytes(random_bytes(3 * BLOCK + 4096, seed=11))
    imported = pvsctl(
        "vdisk", "import", str(source), "--name", "gold", "--store", str(store),
        "--block-size", "4K",
    )
    assert imported.returncode == 0, imported.stderr
    before = manifest_of(store, "gold")
    assert root_printed(imported.stdout) == before.root.hex()
    assert before.block_size == 4096 and before.created_ns == source.stat().st_mtime_ns

    changed = pvsctl("vdisk", "set", "gold", "--store", str(store), "--version", "4")
    assert changed.returncode == 0, changed.stderr
    after = manifest_of(store, "gold")
    assert root_printed(changed.stdout) == after.root.hex() != before.root.hex()
    assert after.version == 4 and after.created_ns > before.created_ns
    assert after.levels == before.levels, "same digests: the bytes did not change"
    assert 'version = 4' in (store / "gold.vdisk.toml").read_text()
    assert pvsctl("vdisk", "verify", "gold", "--store", str(store)).returncode == 0

    shown = pvsctl("vdisk", "show", "gold", "--store", str(store))
    assert shown.returncode == 0, shown.stderr
    assert "v4" in shown.stdout and after.root.hex()[:16] in shown.stdout, shown.stdout
    assert "manifest: version 4, made " in shown.stdout and "4 KiB blocks" in shown.stdout
    assert f"root {after.root.hex()}" in shown.stdout
    listed = pvsctl("vdisk", "show", "--json", "--store", str(store))
    assert listed.returncode == 0, listed.stderr
    assert f'"root": "{after.root.hex()}"' in listed.stdout


def test_manifest_with_a_version_and_block_size(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "raw.img").write_bytes(random_bytes(256 * 1024, seed=5))  # no manifest yet
    missing = pvsctl("vdisk", "verify", "raw", "--store", str(store))
    assert missing.returncode == 2 and "pvsctl vdisk manifest raw" in missing.stderr
    made = pvsctl(
        "vdisk", "manifest", "raw", "--version", "7", "--block-size", "64K",
        env={"PVS_STORE": str(store)},
    )
    assert made.returncode == 0, made.stderr
    manifest = manifest_of(store, "raw")
    assert (manifest.version, manifest.block_size) == (7, 65536)
    assert 'version = 7' in (store / "raw.vdisk.toml").read_text()
    verified = pvsctl("vdisk", "verify", "raw", env={"PVS_STORE": str(store)})
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for args, said in [
        (("vdisk", "verify", "disk"), "--store"),
        (("vdisk", "verify", "disk", "--store", str(store)), "no vDisk disk"),
        (("vdisk", "verify", "disk", "--store", str(tmp_path / "none")), "not a directory"),
        (("vdisk", "create", "d", "--size", "1M", "--store", str(store), "--block-size", "3K"),
         "power of two"),
        (("vdisk", "manifest", "nothing", "--store", str(store)), "no vDisk nothing"),
    ]:
        result = pvsctl(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert said in result.stderr, (args, result.stderr)
    assert not list(store.iterdir()), "a refused command leaves nothing behind"


def test_a_private_image_being_written_gets_no_new_manifest_or_version(tmp_path: Path) -> None:
    """The writer's server updates the manifest of a Private Image as it writes: pvsctl must
    not make or re-stamp one under it, whatever the writer lock (``NAME.lock``) says."""
    store = tmp_path / "store"
    store.mkdir()
    created = pvsctl("vdisk", "create", "priv", "--size", "1M", "--store", str(store),
                     "--mode", "private")
    assert created.returncode == 0, created.stderr
    manifest = (store / "priv.manifest").read_bytes()
    properties = (store / "priv.vdisk.toml").read_text()
    lock = store / "priv.lock"  # what pvsd.locks writes for the writer's session
    lock.write_text(json.dumps(
        {"server": "pvs7", "session": 42, "device": "kiosk-3", "since": 1_700_000_000.0}))
    for args in (("vdisk", "manifest", "priv", "--store", str(store)),
                 ("vdisk", "manifest", "priv", "--version", "3", "--store", str(store)),
                 ("vdisk", "set", "priv", "--store", str(store), "--version", "2")):
        refused = pvsctl(*args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        message = refused.stderr
        assert message.startswith("pvsctl: cannot make") and message.count("\n") == 1, message
        assert "a target writes now" in message and "detach that target first" in message
        assert "'kiosk-3'" in message and "pvs7" in message, message
        assert (store / "priv.manifest").read_bytes() == manifest, args
        assert (store / "priv.vdisk.toml").read_text() == properties, args

    lock.write_text("{not json")  # unreadable: still a writer, and said so
    unreadable = pvsctl("vdisk", "manifest", "priv", "--store", str(store))
    assert unreadable.returncode == 2 and "cannot be read" in unreadable.stderr, unreadable.stderr

    allowed = pvsctl("vdisk", "set", "priv", "--store", str(store), "--description", "kiosk")
    assert allowed.returncode == 0, allowed.stderr  # only the version is held back

    lock.unlink()  # detached: both work again
    remade = pvsctl("vdisk", "manifest", "priv", "--store", str(store))
    assert remade.returncode == 0, remade.stderr
    restamped = pvsctl("vdisk", "set", "priv", "--store", str(store), "--version", "2")
    assert restamped.returncode == 0, restamped.stderr
    assert manifest_of(store, "priv").version == 2
