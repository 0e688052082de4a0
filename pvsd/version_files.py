"""Making and removing the files of one version of a vDisk in a store.

A new version is a copy of the version it starts from: ``os.copy_file_range`` over the data
segments only (SEEK_DATA / SEEK_HOLE), so the copy keeps the holes, and the kernel shares the
blocks instead of copying them on filesystems that can (XFS, btrfs). Its manifest is the
source's digests under the new number and a new creation time (no pass over the image): a
copy made twice is two versions, never one.

Order matters because pvsd watches the store: the state goes into the properties file first
(a maintenance version must never be advertised as production, not even for one poll), then
the manifest, then the version's boot files (`pvsd.boot`: kernel, initramfs, arguments, each
copied under a temporary name and renamed), then the image appears under its final name by a
rename, and only then the verified record (the rename changes the image's ctime, which the
record holds). A version is deleted with its boot files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from pvs_protocol import manifest as mf
from pvs_protocol.identity import ReplicaIdentity
from pvsd import boot, locks
from pvsd.identity import StatKey, Verified, cache_path, write_verified
from pvsd.manifest import manifest_path, write_manifest
from pvsd.properties import properties_path, set_version_state
from pvsd.versions import VersionState, image_file

log = structlog.get_logger("pvsd.versions")

PROGRESS_INTERVAL = 2.0
_CHUNK = 64 * 1024 * 1024


class VersionFileError(Exception):
    """The files of a version could not be made or removed; the message says what to do."""


def make_version(
    source: Path, store: Path, name: str, version: int, state: VersionState, *,
    created_ns: int | None = None, shared: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReplicaIdentity:
    """Copy the image ``source`` (with its manifest) to version ``version`` of ``name`` in
    ``store``, in state ``state``; returns the new version's identity. Blocking: run it in
    a worker thread."""
    target = store / image_file(name, version)
    if target.exists() or manifest_path(target).exists():
        raise VersionFileError(
            f"{target} exists already: version {version} of {name} was made before; pick "
            "another number or delete that version first"
        )
    try:
        manifest = mf.Manifest.decode(manifest_path(source).read_bytes())
    except (OSError, mf.ManifestError) as error:
        raise VersionFileError(
            f"cannot read the manifest of {source.name}: {error}; check that copy with "
            f"pvsctl vdisk verify {name}"
        ) from None
    new = manifest.restamped(version, created_ns if created_ns is not None else time.time_ns())
    temporary = store / f".{target.name}.new"
    copied: list[Path] = []
    try:
        set_version_state(properties_path(target), version, state)
        _copy_sparse(source, temporary, manifest.size, progress)
        write_manifest(target, new)
        copy_boot_files(source, target, store, copied)
        os.rename(temporary, target)
    except OSError as error:
        for path in (temporary, manifest_path(target), *copied):
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise VersionFileError(
            f"cannot make {target}: {error.strerror or error}; free space or fix the store's "
            "permissions, then try again"
        ) from None
    key = StatKey.of(os.stat(target), shared=shared)
    write_verified(target, Verified(key, mf.node_digest(new.levels[-1])), log=log)
    return new.identity


def copy_boot_files(
    source: Path, target: Path, store: Path, copied: list[Path] | None = None
) -> list[Path]:
    """Copy the boot files of image ``source``'s version that the boot listener would serve
    (`find_boot_files`) to the names of image ``target``'s version (``deb@1.vmlinuz`` ->
    ``deb@2.vmlinuz``), in ``store``: each under a temporary name, then renamed. Returns (and
    appends to ``copied``) the files made, for a caller that must undo them."""
    made = copied if copied is not None else []
    targets = boot.file_names(boot.stem_of(target.name))
    for kind, state in find_boot_files(source, store).items():
        origin = state.real
        if origin is None:
            continue
        final = target.parent / targets[kind]
        temporary = target.parent / f".{final.name}.new"
        try:
            shutil.copyfile(origin, temporary)
            os.rename(temporary, final)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        made.append(final)
    return made


def boot_paths(image: Path) -> list[Path]:
    """Where the boot files of image ``image``'s version are (whether they exist or not)."""
    return [image.parent / name for name in boot.file_names(boot.stem_of(image.name)).values()]


@dataclasses.dataclass(frozen=True, slots=True)
class BootFileState:
    """One boot file of a version as found in its store."""

    path: Path
    """Where it belongs, beside the image."""
    real: Path | None = None
    """The file to read (symlinks followed), when it can be served."""
    problem: str = ""
    """Why it cannot be served although something is there ("" when it can, or is absent)."""
    size: int = 0


def find_boot_files(image: Path, store: Path) -> dict[boot.BootFile, BootFileState]:
    """The boot files of image ``image``'s version in ``store``. One that leads out of the
    store, or is not a regular file, is refused as the store refuses such an image. Blocking."""
    root = store.resolve()
    found = {}
    for kind, name in boot.file_names(boot.stem_of(image.name)).items():
        path = image.parent / name
        try:
            real = path.resolve(strict=True)
            result = os.stat(real)
        except FileNotFoundError:
            found[kind] = BootFileState(path)
            continue
        except (OSError, RuntimeError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            found[kind] = BootFileState(path, problem=f"cannot read {path}: {reason}")
            continue
        if not real.is_relative_to(root):
            found[kind] = BootFileState(
                path, problem=f"{path} leads to {real}, outside the store: copy the file into it"
            )
        elif not stat.S_ISREG(result.st_mode):
            found[kind] = BootFileState(
                path, problem=f"{path} is not a regular file: put the {kind.what} there"
            )
        else:
            found[kind] = BootFileState(path, real, size=result.st_size)
    return found


def file_digest(path: Path) -> str:
    """SHA-256 of a boot file (hex), so that a copy fetched in pieces is known whole. Blocking."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def delete_version(image: Path, version: int) -> list[str]:
    """Remove a version's image, manifest, verified record, lock and boot files, and forget
    its state. Returns the names of the files removed."""
    removed = []
    for path in (
        image, manifest_path(image), cache_path(image), locks.lock_path(image),
        *boot_paths(image),
    ):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path.name)
    set_version_state(properties_path(image), version, None)
    return removed


def _copy_sparse(
    source: Path, target: Path, size: int, progress: Callable[[int, int], None] | None
) -> None:
    """Copy the data segments of ``source``; holes stay holes."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dst, size)
            done, last = 0, time.monotonic()
            for start, end in _segments(src, size):
                offset = start
                while offset < end:
                    copied = _copy_range(src, dst, offset, min(_CHUNK, end - offset))
                    offset += copied
                    done += copied
                    if progress is not None and time.monotonic() - last >= PROGRESS_INTERVAL:
                        last = time.monotonic()
                        progress(done, size)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    try:
        copied = os.copy_file_range(src, dst, count, offset, offset)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        data = os.pread(src, count, offset)
        copied = os.pwrite(dst, data, offset)
    if copied <= 0:
        raise OSError(errno.EIO, f"copy stopped at offset {offset} (source shorter?)")
    return copied


def _segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The data segments of the file, as (start, end); the whole file where the filesystem
    cannot tell."""
    segments, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole from here
                break
            return [(0, size)]
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end))
        offset = end
    return segments
