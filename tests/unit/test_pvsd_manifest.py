"""pvsd/manifest.py on real temporary files: build, load, verify, in-place updates."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from pvs_protocol import manifest as mf
from pvsd.identity import ImageChanged
from pvsd.manifest import (
    build_manifest,
    load_manifest,
    manifest_path,
    verify_image,
    write_and_record,
    write_manifest,
)

BLOCK = 4096
log = structlog.get_logger("test")


def image(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(size))
    return path


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


async def built(path: Path, block_size: int = BLOCK) -> mf.Manifest:
    manifest = await build_manifest(path, 3, None, block_size, log=log, threads=2)
    write_manifest(path, manifest)
    return manifest


@pytest.mark.parametrize("size", [0, 1, BLOCK, 5 * BLOCK + 123, 200 * BLOCK, 20_000 * BLOCK + 7])
async def test_build_matches_the_pure_tree_and_loads(tmp_path: Path, size: int) -> None:
    path = image(tmp_path, size)
    manifest = await built(path)
    data = path.read_bytes()
    expected = mf.Manifest.build(
        3, path.stat().st_mtime_ns, size, BLOCK, b"".join(mf.hash_blocks(data, BLOCK))
    )
    assert manifest == expected  # several threads, one tree; created_ns is the mtime
    loaded = load_manifest(path)
    assert loaded.identity == manifest.identity
    for level in range(manifest.shape.top_level + 1):
        for page in range(max(manifest.shape.pages(level), 1)):
            assert loaded.page(level, page) == manifest.page(level, page)
    verdict = await verify_image(path, loaded, log=log)
    assert verdict.good and verdict.first_bad == -1


@pytest.mark.parametrize("where", ["first", "last", "short last"])
async def test_a_flipped_byte_names_its_block(tmp_path: Path, where: str) -> None:
    size = 300 * BLOCK + (100 if where == "short last" else 0)
    path = image(tmp_path, size)
    loaded_manifest = await built(path)
    offset = {"first": 0, "last": size - 1, "short last": size - 50}[where]
    flip(path, offset)
    found: list[int] = []
    verdict = await verify_image(
        path, load_manifest(path), log=log, on_bad=found.append, rate=1e9
    )
    await asyncio.sleep(0)  # on_bad arrives through the loop
    block_start = offset - offset % BLOCK
    assert (verdict.bad_blocks, verdict.first_bad) == (1, block_start)
    assert found == [block_start]
    assert loaded_manifest.shape.blocks_of(offset, 1) == range(
        block_start // BLOCK, block_start // BLOCK + 1
    )


async def test_a_damaged_manifest_file_is_refused(tmp_path: Path) -> None:
    path = image(tmp_path, 300 * BLOCK)
    await built(path)
    for at in (mf.HEADER_SIZE + 5, manifest_path(path).stat().st_size - 1, 50):
        good = manifest_path(path).read_bytes()
        flip(manifest_path(path), at)
        with pytest.raises(mf.ManifestError):
            load_manifest(path)
        manifest_path(path).write_bytes(good)
    load_manifest(path)
    with manifest_path(path).open("r+b") as file:
        file.truncate(100)
    with pytest.raises(mf.ManifestError):
        load_manifest(path)


async def test_in_place_updates_follow_writes_and_survive_reload(tmp_path: Path) -> None:
    size = 40_000 * BLOCK + 1000  # three levels, a short last block
    path = image(tmp_path, size)
    await built(path)
    handle = load_manifest(path)
    handle.open_for_writing()
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, length in [(0, 10), (BLOCK - 3, 7), (5 * BLOCK, 3 * BLOCK),
                               (size - 500, 500), (128 * 128 * BLOCK - 1, 2)]:
            identity = write_and_record(fd, handle, offset, os.urandom(length))
        handle.sync()
    finally:
        os.close(fd)
    rebuilt = await build_manifest(path, 3, handle.created_ns, BLOCK, log=log)
    assert identity == rebuilt.identity == handle.identity
    assert load_manifest(path).identity == identity
    assert (await verify_image(path, load_manifest(path), log=log)).good


async def test_a_torn_update_is_repaired_only_when_asked(tmp_path: Path) -> None:
    path = image(tmp_path, 300 * BLOCK)
    manifest = await built(path)
    with manifest_path(path).open("r+b") as file:  # a leaf rewritten, its parents not yet
        file.seek(mf.HEADER_SIZE)
        file.write(bytes(32))
    with pytest.raises(mf.ManifestError):
        load_manifest(path)
    repaired = load_manifest(path, repair=True)
    assert repaired.root != manifest.root and repaired.version == manifest.version
    assert load_manifest(path).identity == repaired.identity


async def test_progress_is_logged_and_a_change_is_noticed(tmp_path: Path) -> None:
    path = image(tmp_path, 24 * 1024 * 1024)
    with capture_logs() as logs:
        await build_manifest(path, 1, None, log=structlog.get_logger(), progress_interval=0)
    progress = [entry for entry in logs if entry["event"] == "manifest_progress"]
    assert progress and progress[-1]["percent"] == 100.0 and progress[-1]["mb_per_s"] > 0
    manifest = write_manifest(path, await build_manifest(path, 1, None, log=log))
    assert manifest.exists()
    handle = load_manifest(path)
    with path.open("ab") as file:
        file.write(b"x")
    with pytest.raises(ImageChanged):
        await verify_image(path, handle, log=log)
