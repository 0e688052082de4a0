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
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from pvs_protocol import manifest as mf
from pvs_protocol import sizes
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity
from pvsd.console import UserError
from pvsd.console.progress import meter
from pvsd.identity import ImageChanged, Verified, write_verified
from pvsd.locks import lock_path, read_owner
from pvsd.manifest import build_manifest, load_manifest, manifest_path, verify_image, write_manifest
from pvsd.versions import image_file, parse_key

STORE_ENV = "PVS_STORE"
PROGRESS_INTERVAL = 0.2
_WRITE_CHUNK = 8 << 20

T = TypeVar("T")
_log = structlog.get_logger("pvsctl")


def parse_block_size(text: str) -> int:
    """``16K``, ``16KiB``, ``16384``, ``1M``: a power of two from 4 KiB to 1 MiB, in the units
    of every tool (`pvs_protocol.sizes`). An argparse type: a bad value is a usage error, exit
    code 2 (a `SizeError` is an ArgumentTypeError)."""
    size = sizes.parse_size(text)
    try:
        mf.check_block_size(size)
    except mf.ManifestError as error:
        raise argparse.ArgumentTypeError(
            f"{error}; write e.g. 4K, 16K (the default) or 64K (K = 1024 bytes, KB = 1000)"
        ) from None
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


class Described(Protocol):
    """What `describe` and `manifest_json` need: a whole `mf.Manifest` or just its `Header`."""

    @property
    def version(self) -> int: ...
    @property
    def created_ns(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def root(self) -> bytes: ...
    @property
    def shape(self) -> mf.Shape: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """A manifest's header fields, read without the digests (which are a 512th of the
    image: 4 GiB for 2 TiB)."""

    version: int
    created_ns: int
    size: int
    block_size: int
    root: bytes
    top: bytes
    """The digest of the top page: the content alone (what `pvsd.identity.Verified` records)."""

    @property
    def shape(self) -> mf.Shape:
        return mf.Shape.of(self.size, self.block_size)

    @property
    def identity(self) -> ReplicaIdentity:
        return ReplicaIdentity(
            self.version, self.created_ns, self.size, self.root, self.block_size
        )


def write_empty_manifest(
    image: Path, size: int, block_size: int, version: int, created_ns: int, *, label: str
) -> Header:
    """Write the manifest of an image of zeros beside ``image``, without reading it and
    without holding it in memory (4 GiB for 2 TiB of 16 KiB blocks), with progress.

    Every full block of zeros has the same digest, so each level of the tree is one digest
    repeated, then at most one other (over a short last block, or the short last page of the
    level below): a level is written as that run, and the next level follows from it alone.
    Written to a temporary file and renamed into place, so an interrupted run leaves nothing.
    """
    shape = mf.Shape.of(size, block_size)
    full, rest = divmod(size, block_size)
    runs = [(mf.leaf_digest(bytes(block_size)), full, mf.leaf_digest(bytes(rest)) if rest else b"")]
    for _ in range(shape.top_level):
        runs.append(_level_above(*runs[-1]))
    unit, count, tail = runs[-1]
    top = mf.node_digest(unit * count + tail)
    root = mf.root_digest(version, created_ns, size, block_size, top)
    header = Header(version, created_ns, size, block_size, root, top)
    head = mf.Manifest(version, created_ns, size, block_size, (b"",), root).encode()
    total = mf.HEADER_SIZE + sum(shape.counts) * DIGEST_SIZE
    path = manifest_path(image)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with open(descriptor, "wb") as file, meter(label, total) as update:
            os.fchmod(file.fileno(), 0o644)
            file.write(head[: mf.HEADER_SIZE])
            for unit, count, tail in runs:
                chunk = unit * (_WRITE_CHUNK // DIGEST_SIZE)
                whole, part = divmod(count * DIGEST_SIZE, len(chunk))
                for _ in range(whole):
                    file.write(chunk)
                    update(file.tell())
                file.write(chunk[:part] + tail)
            if file.tell() != total:
                raise AssertionError(f"wrote {file.tell()} bytes of a {total}-byte manifest")
            file.flush()
            os.fsync(file.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return header


def _level_above(unit: bytes, count: int, tail: bytes) -> tuple[bytes, int, bytes]:
    """The run of the level above ``count`` times ``unit`` followed by ``tail``."""
    pages, left = divmod(count, mf.FANOUT)
    rest = unit * left + tail
    above = b"".join(
        mf.node_digest(rest[start : start + mf.PAGE_SIZE])
        for start in range(0, len(rest), mf.PAGE_SIZE)
    )
    if len(above) > DIGEST_SIZE:
        raise AssertionError("a level of zeros ends in more than one odd digest")
    return mf.node_digest(unit * mf.FANOUT), pages, above


def make_manifest(
    image: Path, version: int, created_ns: int, block_size: int, *, label: str
) -> mf.Manifest:
    """Read the whole image into a new manifest, with a progress bar (not yet written)."""
    size = image.stat().st_size
    with _runner() as run, _bar(label, size) as (log, _update):
        try:
            return run(
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
        raise UserError(f"{path} is damaged ({error}); {_DAMAGED_MANIFEST}") from None


def read_header(image: Path) -> Header | None:
    """The header of the manifest beside ``image``, checked against its file's length and
    its top page (a few KiB read, whatever the image's size: `vdisk show` must stay quick);
    None if there is none. The digests below the top are `vdisk verify`'s to check."""
    path = manifest_path(image)
    try:
        with path.open("rb") as file:
            length = os.fstat(file.fileno()).st_size
            version, created_ns, size, block_size, root = mf.decode_header(
                file.read(mf.HEADER_SIZE)
            )
            shape = mf.Shape.of(size, block_size)
            expected = mf.HEADER_SIZE + sum(shape.counts) * DIGEST_SIZE
            if length != expected:
                raise mf.ManifestError(f"it is {length} bytes long, its header implies {expected}")
            file.seek(mf.level_offset(shape, shape.top_level))
            top = mf.node_digest(file.read(shape.page_length(shape.top_level, 0)))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror}; make it readable") from None
    except mf.ManifestError as error:
        raise UserError(f"{path} is damaged ({error}); {_DAMAGED_MANIFEST}") from None
    if mf.root_digest(version, created_ns, size, block_size, top) != root:
        raise UserError(f"{path} is damaged (its root does not match its tree); "
                        f"{_DAMAGED_MANIFEST}")
    return Header(version, created_ns, size, block_size, root, top)


_DAMAGED_MANIFEST = (
    "copy the image and its manifest again from a server where `pvsctl vdisk verify` finds it "
    "good, or make a new version from this image with `pvsctl vdisk manifest`"
)


def restamp(image: Path, version: int, created_ns: int) -> mf.Manifest | None:
    """Give the manifest beside ``image`` a new version and creation time (same digests: no
    pass over the image). None if the image has no manifest yet."""
    manifest = read_manifest(image)
    if manifest is None:
        return None
    updated = manifest.restamped(version, created_ns)
    save_manifest(image, updated)
    return updated


def describe(manifest: Described) -> str:
    """One line: ``version 2, made 2026-12-01 10:00:00, 16.0 MiB, 16 KiB blocks, root ...``."""
    from pvsd.console.tables import human_size

    return (
        f"version {manifest.version}, made {format_ns(manifest.created_ns)}, "
        f"{human_size(manifest.size)}, {manifest.block_size // 1024} KiB blocks, "
        f"root {manifest.root.hex()}"
    )


def manifest_json(manifest: Described) -> dict[str, object]:
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
        with _runner() as run, _bar(f"verifying {name}", handle.size) as (log, _update):
            try:
                verdict = run(
                    verify_image(
                        image, handle, log=log, progress_interval=PROGRESS_INTERVAL, direct=True
                    )
                )
            except ImageChanged:
                raise UserError(
                    f"{image} changed while it was being verified; run the command again once "
                    "nothing writes to it"
                ) from None
            if verdict.good:  # as pvsd records its own checks: it need not read it again
                write_verified(image, Verified(verdict.stat, handle.top), log=log)
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


@contextlib.contextmanager
def _runner() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Runs a pass on an event loop made *before* the first progress line: Ctrl-C right
    after that line must not land in the middle of making a loop (Python then prints a
    traceback from the half-made loop's __del__). An interrupt before the pass starts still
    closes the coroutine and the loop, so the user sees one line."""
    with asyncio.Runner() as runner:
        runner.get_loop()

        def run(coroutine: Coroutine[Any, Any, T]) -> T:
            try:
                return runner.run(coroutine)
            finally:
                coroutine.close()

        yield run


@contextlib.contextmanager
def _bar(label: str, total: int) -> Iterator[tuple[FilteringBoundLogger, Callable[[int], None]]]:
    """Progress on stderr (`pvsd.console.progress`) fed by the pass's own ``*_progress`` log
    events; its other events go on to pvsctl's logging, which shows warnings only (more with
    -v), so that stdout holds only the result."""

    def feed(_logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        name = str(event.pop("event", ""))
        if name.endswith("_progress"):
            percent = event.get("percent")
            if isinstance(percent, int | float):
                update(int(total * percent / 100))
        else:
            getattr(_log, method, _log.info)(name, **event)
        raise structlog.DropEvent

    log: FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr), processors=[feed],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    with meter(label, total) as update:
        yield log, update
        update(total)
