"""pvsctl's work on manifests in a local store: make, re-stamp, verify, describe.

A manifest (``NAME.manifest`` beside ``NAME.img``) is the identity of one version of a vDisk:
version, creation time, size, block size and the root of a hash tree over the blocks
(`pvs_protocol.manifest`). These helpers make one when a version is made (create, import,
``vdisk manifest``), give the same digests a new version and time (``vdisk set --version``),
and check a copy against its manifest (``vdisk verify``), with a progress bar on stderr.
Every failure is a `UserError` that names the file and says what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import structlog
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from pvs_protocol import manifest as mf
from pvs_protocol.identity import DIGEST_SIZE
from pvsd.console import UserError
from pvsd.identity import ImageChanged
from pvsd.locks import lock_path, read_owner
from pvsd.manifest import build_manifest, load_manifest, manifest_path, verify_image, write_manifest
from pvsd.versions import image_file, parse_key

STORE_ENV = "PVS_STORE"
PROGRESS_INTERVAL = 0.2
_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20}

T = TypeVar("T")


def parse_block_size(text: str) -> int:
    """``16K``, ``16KiB``, ``16384``, ``1M``: a power of two from 4 KiB to 1 MiB (an argparse
    type: a bad value is a usage error, exit code 2)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not understood; write e.g. 4K, 16K or 64K")
    size = int(match[1]) * _BINARY[match[2].lower()]
    try:
        mf.check_block_size(size)
    except mf.ManifestError as error:
        raise argparse.ArgumentTypeError(f"{error}; 16K is the default") from None
    return size


def store_directory(path: Path | None) -> Path:
    """``--store DIR``, else ``$PVS_STORE``; a usage error if neither names a directory."""
    if path is None:
        value = os.environ.get(STORE_ENV)
        if not value:
            raise UserError(f"which store? give --store DIR (or set {STORE_ENV})")
        path = Path(value)
    if not path.is_dir():
        raise UserError(f"store {path} is not a directory; create it (mkdir -p {path}) first")
    return path


def existing_image(store: Path, name: str, version: int | None = None) -> Path:
    """The image of ``name`` in ``store``: the version asked for, else the plain ``NAME.img``,
    else its newest version."""
    if version is not None:
        candidates = [store / image_file(name, version)]
        plain = store / f"{name}.img"
        if plain.is_file() and manifest_version(plain) == version:
            candidates.append(plain)
    else:
        keys = (parse_key(path.name.removesuffix(".img")) for path in store.glob(f"{name}@*.img"))
        numbers = sorted(number for stem, number in keys if stem == name and number is not None)
        candidates = [store / f"{name}.img"]
        candidates += [store / image_file(name, number) for number in reversed(numbers)]
    for image in candidates:
        if image.is_file():
            return image
    which = f"version {version} of {name}" if version is not None else f"vDisk {name}"
    raise UserError(
        f"no {which} in {store} ({candidates[0]} is not a file); see "
        f"`pvsctl vdisk show --store {store} {name}`"
    )


def manifest_version(image: Path) -> int | None:
    try:
        return mf.Manifest.decode(manifest_path(image).read_bytes()).version
    except (OSError, mf.ManifestError):
        return None


def refuse_while_written(image: Path, name: str, what: str) -> None:
    """Refuse ``what`` (a new manifest or version) while a target writes the image.

    The writer's server keeps the manifest of a Private Image up to date block by block as it
    writes; a manifest made here meanwhile would describe bytes that are already gone (or be
    overwritten by the server's next update), and a re-stamp would give the writer's changing
    content a version an administrator believes fixed. The writer lock (``NAME.lock``, see
    `pvsd.locks`) says a target writes it.
    """
    owner = read_owner(image)
    if owner is None:
        return
    lock = lock_path(image)
    if owner.server == "?":
        holder = f"a writer (its lock {lock} cannot be read)"
    else:
        since = datetime.datetime.fromtimestamp(owner.since, datetime.UTC).astimezone()
        holder = (
            f"device {owner.device!r} through server {owner.server} "
            f"(since {since:%Y-%m-%d %H:%M:%S})"
        )
    raise UserError(
        f"cannot {what} of vDisk {name}: it is a Private Image that a target writes now, "
        f"{holder}; detach that target first (stop its pvs-target), then run the command "
        f"again. A lock left by a crashed server is removed when its device logs in again or "
        f"a peer declares that server down; if none will, and no target is attached, delete "
        f"{lock} by hand"
    )


# -- making manifests -------------------------------------------------------------------------


def empty_manifest(size: int, block_size: int, version: int, created_ns: int) -> mf.Manifest:
    """The manifest of an image of zeros, without reading it: every full block has the same
    digest, only a short last block has another."""
    shape = mf.Shape.of(size, block_size)
    full, rest = divmod(size, block_size)
    leaves = mf.leaf_digest(bytes(block_size)) * full
    if rest:
        leaves += mf.leaf_digest(bytes(rest))
    assert len(leaves) == shape.blocks * DIGEST_SIZE
    return mf.Manifest.build(version, created_ns, size, block_size, leaves)


def make_manifest(
    image: Path, version: int, created_ns: int, block_size: int, *, label: str
) -> mf.Manifest:
    """Read the whole image into a new manifest, with a progress bar (not yet written)."""
    size = image.stat().st_size
    with _bar(label, size) as (log, _update):
        try:
            return _run(
                build_manifest(
                    image, version, created_ns, block_size, log=log,
                    progress_interval=PROGRESS_INTERVAL,
                )
            )
        except ImageChanged:
            raise UserError(
                f"{image} changed while its manifest was being made; run the command again once "
                "nothing writes to it (stop the target using a Private Image first)"
            ) from None


def save_manifest(image: Path, manifest: mf.Manifest) -> Path:
    try:
        return write_manifest(image, manifest)
    except OSError as error:
        raise UserError(
            f"cannot write {manifest_path(image)}: {error.strerror or error}; make the store "
            "writable and run the command again"
        ) from None


def read_manifest(image: Path) -> mf.Manifest | None:
    """The whole manifest beside ``image`` (checked), or None if there is none."""
    path = manifest_path(image)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; make it readable") from None
    try:
        return mf.Manifest.decode(data)
    except mf.ManifestError as error:
        raise UserError(
            f"{path} is damaged ({error}); copy the image and its manifest again from a server "
            "where `pvsctl vdisk verify` finds it good, or make a new version from this image "
            "with `pvsctl vdisk manifest`"
        ) from None


def restamp(image: Path, version: int, created_ns: int) -> mf.Manifest | None:
    """Give the manifest beside ``image`` a new version and creation time (same digests: no
    pass over the image). None if the image has no manifest yet."""
    manifest = read_manifest(image)
    if manifest is None:
        return None
    updated = manifest.restamped(version, created_ns)
    save_manifest(image, updated)
    return updated


def describe(manifest: mf.Manifest) -> str:
    """One line: ``version 2, made 2026-12-01 10:00:00, 16.0 MiB, 16 KiB blocks, root ...``."""
    from pvsd.console.tables import human_size

    return (
        f"version {manifest.version}, made {format_ns(manifest.created_ns)}, "
        f"{human_size(manifest.size)}, {manifest.block_size // 1024} KiB blocks, "
        f"root {manifest.root.hex()}"
    )


def manifest_json(manifest: mf.Manifest) -> dict[str, object]:
    return {
        "version": manifest.version, "created_ns": manifest.created_ns,
        "created": format_ns(manifest.created_ns), "size": manifest.size,
        "block_size": manifest.block_size, "blocks": manifest.shape.blocks,
        "root": manifest.root.hex(),
    }


def format_ns(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# -- verifying ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Checked:
    """The outcome of ``vdisk verify``: what to print and the exit code."""

    good: bool
    lines: list[str]


def verify(image: Path, name: str) -> Checked:
    """Check every block of ``image`` against its manifest (read past the page cache where
    the file system allows, so that rot below it is seen)."""
    try:
        handle = load_manifest(image)
    except FileNotFoundError:
        raise UserError(
            f"{image} has no manifest ({manifest_path(image).name}); make one from its current "
            f"content with `pvsctl vdisk manifest {name} --store {image.parent}`, or let pvsd "
            "adopt the image"
        ) from None
    except mf.ManifestError as error:
        return Checked(False, [
            f"vDisk {name}: DAMAGED: its manifest {manifest_path(image)} is damaged ({error})",
            "copy the image and its manifest again from a server where `pvsctl vdisk verify` "
            "finds it good",
        ])
    except OSError as error:
        raise UserError(f"cannot read {manifest_path(image)}: {error.strerror}") from None
    try:
        identity = handle.identity
        size = image.stat().st_size
        if size != handle.size:
            return Checked(False, [
                f"vDisk {name}: DAMAGED: {image} is {size} bytes, its manifest "
                f"({identity.short}) says {handle.size}",
                _fix(name),
            ])
        with _bar(f"verifying {name}", handle.size) as (log, _update):
            try:
                verdict = _run(
                    verify_image(
                        image, handle, log=log, progress_interval=PROGRESS_INTERVAL, direct=True
                    )
                )
            except ImageChanged:
                raise UserError(
                    f"{image} changed while it was being verified; run the command again once "
                    "nothing writes to it"
                ) from None
    finally:
        handle.close()
    blocks = handle.shape.blocks
    if verdict.good:
        return Checked(True, [
            f"vDisk {name}: good: all {blocks} blocks match its manifest "
            f"(version {identity.version}, {handle.block_size // 1024} KiB blocks, "
            f"root {identity.digest.hex()})",
        ])
    first = verdict.first_bad // handle.block_size
    return Checked(False, [
        f"vDisk {name}: DAMAGED: first bad block {first} at offset {verdict.first_bad} "
        f"({verdict.bad_blocks} of {blocks} blocks of {handle.block_size} bytes do not match "
        f"its manifest, version {identity.version}, root {identity.digest.hex()[:16]}...)",
        _fix(name),
    ])


def _fix(name: str) -> str:
    return (
        f"this copy must not be served: copy {name}.img and {name}.manifest over it from a server "
        "whose copy `pvsctl vdisks` shows as identical (cp, or rsync -t --ignore-times: plain "
        "rsync skips a damaged copy whose size and time match), or, if these bytes "
        f"are a change you meant, make them a new version: `pvsctl vdisk manifest {name}`"
    )


# -- plumbing -----------------------------------------------------------------------------------


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@contextlib.contextmanager
def _bar(label: str, total: int) -> Iterator[tuple[FilteringBoundLogger, Callable[[int], None]]]:
    """A progress bar on stderr fed by the pass's own ``*_progress`` log events; every other
    info event is dropped (warnings still show), so stdout holds only the result."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty(),
    )
    task = progress.add_task(label, total=total)

    def update(done: int) -> None:
        progress.update(task, completed=done)

    def feed(_logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        name = str(event.get("event", ""))
        if name.endswith("_progress"):
            percent = event.get("percent")
            if isinstance(percent, int | float):
                update(int(total * percent / 100))
            raise structlog.DropEvent
        if method in ("debug", "info"):
            raise structlog.DropEvent
        return event

    log: FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[feed, structlog.processors.add_log_level, structlog.dev.ConsoleRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    with progress:
        yield log, update
        update(total)
