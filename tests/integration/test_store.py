"""The vDisk store on real files: identity, its cache, the watcher, refusals and pvsctl."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs
from structlog.typing import EventDict

from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.manifest import Manifest
from pvs_protocol.modes import Mode
from pvsd.ctl import main
from pvsd.identity import cache_path
from pvsd.manifest import build_manifest, manifest_path, write_manifest
from pvsd.properties import VDiskProperties, load_properties, properties_path, save_properties
from pvsd.store import Catalog, Store, VDisk

MIB = 1024 * 1024
log = structlog.get_logger("test")


def make_image(path: Path, size: int = 3 * MIB, fill: bytes = b"pvs") -> Path:
    path.write_bytes((fill * (size // len(fill) + 1))[:size])
    return path


def events(logs: list[EventDict], name: str) -> list[EventDict]:
    return [entry for entry in logs if entry["event"] == name]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- identity: the manifest, and the record of what was verified ----------------------------


async def adopted(image: Path, version: int = 1) -> ReplicaIdentity:
    """What pvsd adopts for an image without a manifest: its mtime is the creation time."""
    return (await build_manifest(image, version, None, log=log)).identity


async def checked(store: Path) -> tuple[Catalog, list[EventDict]]:
    """One scan of ``store`` by a fresh catalog (as a restarted pvsd), with its logs."""
    catalog = Catalog([store])
    with capture_logs() as logs:
        await catalog.refresh()
    catalog.close()
    return catalog, logs


async def test_copies_that_keep_mtime_are_identical(tmp_path: Path) -> None:
    original = make_image(tmp_path / "a.img")
    os.utime(original, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    shutil.copy2(original, tmp_path / "b.img")
    subprocess.run(["cp", "-p", str(original), str(tmp_path / "c.img")], check=True)
    identities = [await adopted(tmp_path / name) for name in ("a.img", "b.img", "c.img")]
    assert identities[0] == identities[1] == identities[2]
    assert identities[0].timestamp_ns == 1_600_000_000_123_456_789
    assert identities[0].size == 3 * MIB


async def test_same_change_made_to_two_copies_differs_in_timestamp(tmp_path: Path) -> None:
    first = make_image(tmp_path / "a.img")
    second = tmp_path / "b.img"
    shutil.copy2(first, second)
    for copy in (first, second):
        with copy.open("r+b") as file:
            file.write(b"patched")
        time.sleep(0.05)  # the two edits happen at different times, as they would on two servers
    one, other = await adopted(first), await adopted(second)
    # The root covers the creation time too: the same bytes made at two times are two versions.
    assert one.differences(other) == ["timestamp", "content"]


async def test_content_change_with_mtime_set_back_is_damage(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img")
    catalog, _ = await checked(tmp_path)
    before = catalog["a"].identity
    assert before is not None and manifest_path(image).exists()
    times = image.stat()
    with image.open("r+b") as file:
        file.seek(MIB + 5)
        file.write(b"sneaky")
    os.utime(image, ns=(times.st_atime_ns, times.st_mtime_ns))
    catalog, logs = await checked(tmp_path)
    vdisk = catalog["a"]
    assert vdisk.identity is None and vdisk.known_identity == before  # ctime gave it away
    assert vdisk.damage is not None
    assert (vdisk.damage.first_offset, vdisk.damage.bad_blocks) == (MIB, 1)
    assert vdisk.damage.found_by == "verify" and vdisk.damage.complete
    [error] = events(logs, "replica_damaged")
    assert error["log_level"] == "error" and "action" in error


async def test_new_version_of_the_same_bytes_needs_no_pass(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img")
    first = (await checked(tmp_path))[0]["a"].identity
    assert first is not None
    restamped = load_manifest_whole(image).restamped(2, time.time_ns())
    write_manifest(image, restamped)
    catalog, logs = await checked(tmp_path)
    assert not events(logs, "verify_started")
    assert catalog["a"].identity == restamped.identity
    assert first.differences(restamped.identity) == ["version", "timestamp", "content"]


def load_manifest_whole(image: Path) -> Manifest:
    return Manifest.decode(manifest_path(image).read_bytes())


async def test_record_is_reused_and_leaves_the_image_alone(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img")
    stat_before = image.stat()
    _, logs = await checked(tmp_path)
    assert events(logs, "manifest_adopted") and not events(logs, "verify_started")
    cache_path(image).unlink()  # no record of a check: the content is verified
    catalog, logs = await checked(tmp_path)
    assert events(logs, "verify_started")
    catalog, logs = await checked(tmp_path)
    assert not events(logs, "verify_started") and events(logs, "identity_cached")
    # Reading the image may move atime (relatime); what the identity and the administrator
    # care about is that contents, mtime and ctime stay untouched.
    after = image.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino) == (
        stat_before.st_size,
        stat_before.st_mtime_ns,
        stat_before.st_ctime_ns,
        stat_before.st_ino,
    )
    record = json.loads(cache_path(image).read_text())
    assert record["stat"]["ctime_ns"] == stat_before.st_ctime_ns
    assert catalog["a"].manifest is not None
    assert record["top"] == catalog["a"].manifest.top.hex()


async def test_record_is_invalidated_by_any_change_of_the_stat_key(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img")
    first = (await checked(tmp_path))[0]["a"].identity
    os.chmod(image, 0o600)  # touches ctime only: the content may have changed with it
    catalog, logs = await checked(tmp_path)
    assert events(logs, "verify_started") and catalog["a"].identity == first
    replacement = make_image(tmp_path / "new", fill=b"pvs")
    os.replace(replacement, image)  # same bytes, new inode
    catalog, logs = await checked(tmp_path)
    assert events(logs, "verify_started") and catalog["a"].identity == first


async def test_unwritable_record_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    make_image(tmp_path / "a.img")
    cache_path(tmp_path / "a.img").mkdir()  # a directory cannot be replaced by a file
    catalog, logs = await checked(tmp_path)
    assert catalog["a"].identity is not None
    warnings = events(logs, "verified_record_not_written")
    assert warnings
    assert all(entry["log_level"] == "warning" and "action" in entry for entry in warnings)


async def test_making_a_manifest_reports_progress(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.img", size=24 * MIB)
    with capture_logs() as logs:
        await build_manifest(image, 1, None, log=structlog.get_logger(), progress_interval=0)
    progress = events(logs, "manifest_progress")
    assert progress[-1]["percent"] == 100.0
    assert all(entry["mb_per_s"] > 0 for entry in progress)


# -- the watching catalog -------------------------------------------------------------------


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[Catalog, list[tuple[str, object]]]]:
    """A catalog over tmp_path/store, watched every 20 ms; yields it with its change record."""
    store = tmp_path / "store"
    store.mkdir()
    make_image(store / "win10.img")
    catalog = Catalog([store])
    seen: list[tuple[str, object]] = []
    catalog.on_change(lambda name, vdisk: seen.append((name, vdisk and vdisk.identity)))
    async with asyncio.TaskGroup() as tasks:
        watcher = tasks.create_task(catalog.watch(interval=0.02))
        async with asyncio.timeout(10):
            await catalog.ready()
        yield catalog, seen
        watcher.cancel()
    catalog.close()


async def test_watcher_withdraws_at_once_then_finds_damage_then_a_new_version(
    watched: tuple[Catalog, list[tuple[str, object]]],
) -> None:
    catalog, seen = watched
    vdisk = catalog["win10"]
    old = vdisk.identity
    assert isinstance(old, ReplicaIdentity)
    seen.clear()
    with vdisk.path.open("r+b") as file:
        file.write(b"changed")
    await until(lambda: vdisk.damage is not None)
    assert seen[0] == ("win10", None)  # withdrawn before anything else happened
    assert vdisk.identity is None and vdisk.known_identity == old
    # The administrator makes the change a new version (pvsctl vdisk manifest):
    time.sleep(0.01)
    write_manifest(vdisk.path, await build_manifest(vdisk.path, 2, time.time_ns(), log=log))
    await until(lambda: vdisk.identity is not None)
    published = catalog["win10"].identity
    assert published is not None and catalog["win10"].damage is None
    assert seen[-1] == ("win10", published)
    assert old.differences(published) == [
        "version",
        "timestamp",
        "content",
    ]


async def test_watcher_follows_replaced_files_and_manifests(
    watched: tuple[Catalog, list[tuple[str, object]]],
) -> None:
    catalog, _ = watched
    vdisk = catalog["win10"]
    held = vdisk.file
    replacement = make_image(vdisk.path.with_name("incoming"), size=MIB, fill=b"new")
    os.replace(replacement, vdisk.path)
    await until(lambda: vdisk.damage is not None)  # its manifest is of another image
    assert vdisk.damage is not None and vdisk.damage.found_by == "size"
    manifest_path(vdisk.path).unlink()  # no manifest: adopted from the content
    await until(lambda: vdisk.identity is not None and vdisk.identity.size == MIB)
    assert vdisk.file is not held
    assert os.fstat(vdisk.fd).st_ino == vdisk.path.stat().st_ino
    assert os.fstat(held.fd).st_size == 3 * MIB  # a reader holding the old file keeps it


async def test_watcher_picks_up_new_images_and_drops_deleted_ones(
    watched: tuple[Catalog, list[tuple[str, object]]],
) -> None:
    catalog, seen = watched
    store = catalog["win10"].path.parent
    make_image(store / "linux.img", size=MIB)
    await until(lambda: "linux" in catalog and catalog["linux"].identity is not None)
    (store / "win10.img").unlink()
    await until(lambda: "win10" not in catalog)
    assert ("win10", None) in seen


async def test_refusals_are_logged_once_and_never_served(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    outside = make_image(tmp_path / "outside.img")
    make_image(store / "good.img")
    (store / "sub").mkdir()
    make_image(store / "sub" / "real.raw")
    (store / "inside.img").symlink_to(store / "sub" / "real.raw")
    refused = {
        "bad name.img": "not allowed",
        "-flag.img": "not allowed",
        "out.img": "outside the store",
        "dangling.img": "cannot be resolved",
        "dir.img": "not a regular file",
        "fifo.img": "not a regular file",
        "props.img": "block_size",
    }
    make_image(store / "bad name.img")
    make_image(store / "-flag.img")
    (store / "out.img").symlink_to(outside)
    (store / "dangling.img").symlink_to(store / "nowhere")
    (store / "dir.img").mkdir()
    os.mkfifo(store / "fifo.img")
    make_image(store / "props.img")
    (store / "props.vdisk.toml").write_text("block_size = 1000\n")
    catalog = Catalog([Store(store)])
    try:
        with capture_logs() as logs:
            await catalog.refresh()
            await catalog.refresh()
        assert sorted(catalog) == ["good", "inside"]
        warnings = events(logs, "vdisk_refused")
        assert sorted(Path(entry["file"]).name for entry in warnings) == sorted(refused)
        for entry in warnings:
            assert refused[Path(entry["file"]).name] in entry["reason"]
            assert entry["action"] and entry["log_level"] == "warning"
        (store / "props.vdisk.toml").write_text("block_size = 512\n")
        await catalog.refresh()
        assert catalog["props"].properties.block_size == 512
        assert catalog["props"].identity is not None
    finally:
        catalog.close()


async def test_properties_turning_invalid_withdraw_the_vdisk(tmp_path: Path) -> None:
    make_image(tmp_path / "a.img")
    catalog = Catalog([tmp_path])
    try:
        await catalog.refresh()
        assert catalog["a"].identity is not None
        properties_path(tmp_path / "a.img").write_text('mode = "shared"\n')
        await catalog.refresh()
        assert "a" not in catalog
    finally:
        catalog.close()


async def test_first_store_wins_a_duplicate_name(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for store in (first, second):
        store.mkdir()
        make_image(store / "win10.img")
    make_image(second / "only.img")
    catalog = Catalog([Store(first), Store(second)])
    try:
        with capture_logs() as logs:
            await catalog.refresh()
            await catalog.refresh()
        assert catalog["win10"].path == first / "win10.img"
        assert catalog["only"].path == second / "only.img"
        [warning] = events(logs, "vdisk_shadowed")
        assert warning["file"] == str(second / "win10.img")
    finally:
        catalog.close()


async def test_ready_waits_for_every_initial_identity(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        make_image(tmp_path / f"{name}.img", size=MIB, fill=name.encode())
    catalog = Catalog([tmp_path])
    try:
        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(catalog.watch())
            async with asyncio.timeout(10):
                await catalog.ready()
            assert all(isinstance(vdisk, VDisk) and vdisk.identity for vdisk in catalog.values())
            watcher.cancel()
    finally:
        catalog.close()


# -- pvsctl -----------------------------------------------------------------------------------


def pvsctl(
    command: str, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``pvsctl`` with the words of ``command`` followed by ``args``."""
    return subprocess.run(
        [sys.executable, "-m", "pvsd.ctl", *command.split(), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_vdisk_create_makes_a_sparse_image_and_properties(tmp_path: Path) -> None:
    result = pvsctl(
        "vdisk create win10 --size 1G --mode private --store", tmp_path, "--description", "gold"
    )
    assert result.returncode == 0, result.stderr
    image = tmp_path / "win10.img"
    assert image.stat().st_size == 1024**3
    assert image.stat().st_blocks == 0
    properties = load_properties(properties_path(image))
    assert properties.mode is Mode.private and properties.description == "gold"
    again = pvsctl("vdisk create win10 --size 1M --store", tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert image.stat().st_size == 1024**3


@pytest.mark.parametrize(
    ("size", "said"),
    [("1000", "multiple of 512"), ("12 parsecs", "not understood"), ("0", "positive")],
)
def test_vdisk_create_refuses_bad_sizes(tmp_path: Path, size: str, said: str) -> None:
    result = pvsctl("vdisk create x --store", tmp_path, "--size", size)
    assert result.returncode == 2
    assert said in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "x.img").exists()


@pytest.mark.parametrize(
    "command",
    ["vdisk create ../evil --size 1M", "vdisk show nothing", "vdisk set nothing --version 2"],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    result = pvsctl(command, "--store", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("pvsctl: ") and "Traceback" not in result.stderr


def test_vdisk_import_raw_keeps_holes_and_mtime(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    with source.open("wb") as file:
        file.write(b"boot" * 128)
        file.seek(64 * MIB)
        file.write(b"end!" * 128)
    os.utime(source, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    store = tmp_path / "store"
    store.mkdir()
    result = pvsctl("vdisk import --name disk", source, "--store", store)
    assert result.returncode == 0, result.stderr
    image = store / "disk.img"
    assert image.read_bytes() == source.read_bytes()
    assert image.stat().st_blocks * 512 < 4 * MIB
    assert image.stat().st_mtime_ns == source.stat().st_mtime_ns
    assert properties_path(image).exists()
    assert sorted(path.name for path in store.iterdir()) == [
        "disk.img", "disk.manifest", "disk.vdisk.toml",
    ]


def test_vdisk_import_converts_qcow2(tmp_path: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed")
    raw = make_image(tmp_path / "disk.raw", size=2 * MIB, fill=b"qcow")
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    result = pvsctl("vdisk import --name disk", qcow2, "--store", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(qcow2)" in result.stdout
    assert (tmp_path / "disk.img").read_bytes() == raw.read_bytes()


def test_vdisk_import_without_qemu_img_refuses_other_formats(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(1020))
    raw = make_image(tmp_path / "disk.raw", size=MIB)
    without_qemu = {**os.environ, "PATH": str(tmp_path / "empty")}
    refused = pvsctl("vdisk import --name a", qcow2, "--store", tmp_path, env=without_qemu)
    assert refused.returncode == 2
    assert "looks like qcow2" in refused.stderr and "qemu-utils" in refused.stderr
    assert not (tmp_path / "a.img").exists()
    imported = pvsctl("vdisk import --name b", raw, "--store", tmp_path, env=without_qemu)
    assert imported.returncode == 0, imported.stderr
    assert (tmp_path / "b.img").read_bytes() == raw.read_bytes()


def test_usage_errors_exit_2_without_running_anything() -> None:
    assert main(["vdisk"]) == 2
    assert main(["vdisk", "create", "x"]) == 2  # --size and --store are required
    assert main(["--help"]) == 0


def test_vdisk_set_edits_the_properties_file(tmp_path: Path) -> None:
    make_image(tmp_path / "win10.img")
    options = "--version 3 --maintenance on --subnet-affinity best_effort"
    result = pvsctl(f"vdisk set win10 {options} --store", tmp_path)
    assert result.returncode == 0, result.stderr
    properties = load_properties(properties_path(tmp_path / "win10.img"))
    assert (properties.version, properties.maintenance) == (3, True)
    refused = pvsctl("vdisk set win10 --load-balancing off --store", tmp_path)
    assert refused.returncode == 2 and "--fixed-server" in refused.stderr
    options = "--load-balancing off --fixed-server pvs1"
    fixed = pvsctl(f"vdisk set win10 {options} --store", tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    properties = load_properties(properties_path(tmp_path / "win10.img"))
    assert (properties.load_balancing, properties.fixed_server, properties.version) == (
        False,
        "pvs1",
        3,
    )


def test_vdisk_show_lists_properties_and_identity(tmp_path: Path) -> None:
    make_image(tmp_path / "win10.img")
    save_properties(properties_path(tmp_path / "win10.img"), VDiskProperties(version=4))
    result = pvsctl("vdisk show --json --store", tmp_path)
    assert result.returncode == 0, result.stderr
    [shown] = json.loads(result.stdout)
    assert shown["name"] == "win10" and shown["size"] == 3 * MIB
    assert shown["properties"]["version"] == 4
    # show reads no image: it makes no manifest, and says how to make one
    assert shown["identity"] is None and shown["manifest_problem"].startswith("no manifest yet")
    assert not (tmp_path / "win10.manifest").exists()
    made = pvsctl("vdisk manifest win10 --store", tmp_path)
    assert made.returncode == 0, made.stderr
    again = pvsctl("vdisk show win10 --json --store", tmp_path)
    assert again.returncode == 0, again.stderr
    [shown_again] = json.loads(again.stdout)
    identity = shown_again["identity"]
    assert identity["version"] == 4 and len(identity["digest"]) == 64
