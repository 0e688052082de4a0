"""``pvsctl vdisk show``: what local stores hold, without a pass over any image.

Listing must stay instant whatever the images' size: a new 2 TiB image takes minutes to hash.
So nothing is hashed here, nothing is written, and no manifest is made: each image's manifest
header is read (with its top page, to catch a damaged file), and whether the image was checked
against it is taken from the record pvsd and `pvsctl vdisk verify` leave beside it
(`pvsd.identity.Verified`, valid only while the image's stat key is unchanged). An image
without a manifest is shown as such, with the command that makes one. Whether a version can
be booted over the network (its kernel and initramfs beside the image, `pvsd.boot`) is shown
too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from pvs_protocol.modes import VersionState
from pvsd import boot
from pvsd.console import UserError
from pvsd.console import manifests as mfc
from pvsd.console.tables import human_size
from pvsd.identity import read_verified
from pvsd.store import Store, VDisk
from pvsd.version_files import BootFileState, find_boot_files

_log = structlog.get_logger("pvsctl")
_NO_MANIFEST = "no manifest yet"


@dataclasses.dataclass(frozen=True, slots=True)
class Listed:
    """One image of a store as `vdisk show` tells it."""

    vdisk: VDisk
    version: int
    manifest: mfc.Header | None
    problem: str
    """Why the manifest cannot be shown or trusted ("" when it can)."""
    verified: bool
    """The image was checked whole against this manifest and has not changed since."""
    recorded: bool = False
    """A check of the image was recorded (`verified` is False if it changed since)."""
    boot_files: dict[boot.BootFile, BootFileState] = dataclasses.field(default_factory=dict)
    """The version's boot files as the boot listener would find them."""

    @property
    def bootable(self) -> bool:
        """Its kernel and initramfs can be served (pvsd's boot_listen)."""
        return all(
            kind in self.boot_files and self.boot_files[kind].real is not None
            for kind in boot.SERVED
        )

    @property
    def state(self) -> VersionState:
        return self.vdisk.properties.state_of(self.version)

    @property
    def size_differs(self) -> bool:
        return self.manifest is not None and self.manifest.size != self.vdisk.size


def list_stores(paths: Sequence[Path], name: str | None) -> list[Listed]:
    """Every image in ``paths`` (the first store wins for a name in several), or only the
    versions of ``name``; a `UserError` if ``name`` is in none of them."""
    stores = [Store(path) for path in paths]
    try:
        for store in stores:
            store.poll()
        found = _first_of_each(stores)
        listed = [
            dataclasses.replace(
                _listed(vdisk), boot_files=find_boot_files(vdisk.path, vdisk.store.path)
            )
            for vdisk in found
        ]
    finally:
        for store in stores:
            store.close()
    if name is not None:
        listed = _versions_of(name, listed)
        if not listed:
            where = " ".join(f"--store {path}" for path in paths)
            raise UserError(f"no vDisk {name} in {where}; check the name")
    return sorted(listed, key=lambda item: (item.vdisk.name, item.version))


def _first_of_each(stores: Iterable[Store]) -> list[VDisk]:
    seen: dict[str, VDisk] = {}
    for store in stores:
        for key, vdisk in sorted(store.vdisks.items()):
            if key in seen:
                _log.warning(
                    "vdisk_shadowed", vdisk=key, file=str(vdisk.path),
                    served=str(seen[key].path),
                    action="rename or remove one of them; only the first store's is served",
                )
                continue
            seen[key] = vdisk
    return list(seen.values())


def _listed(vdisk: VDisk) -> Listed:
    try:
        header = mfc.read_header(vdisk.path)
    except UserError as error:
        return Listed(vdisk, vdisk.version, None, str(error), False)
    if header is None:
        store = vdisk.store.path
        problem = (
            f"{_NO_MANIFEST}; make one with `pvsctl vdisk manifest {vdisk.name} --store "
            f"{store}` (it reads the whole image), or let pvsd make it when it serves the store"
        )
        return Listed(vdisk, vdisk.version, None, problem, False)
    version = vdisk.file_version if vdisk.file_version is not None else header.version
    record = read_verified(vdisk.path)
    verified = record is not None and record.top == header.top and record.stat in (
        vdisk.stat, dataclasses.replace(vdisk.stat, dev=0)  # a shared store's record: no dev
    )
    return Listed(vdisk, version, header, "", verified, recorded=record is not None)


def _versions_of(name: str, listed: list[Listed]) -> list[Listed]:
    """A plain ``NAME.img`` and a ``NAME@N.img`` of the same number: the versioned file wins,
    as it does in pvsd's catalog."""
    found: dict[int, Listed] = {}
    for item in listed:
        if item.vdisk.name != name:
            continue
        if item.version not in found or item.vdisk.file_version is not None:
            found[item.version] = item
    return list(found.values())


# -- what is printed ----------------------------------------------------------------------------


COLUMNS = (
    "Name", "Size", "Mode", "Version", "Maint.", "Served by", "Affinity", "Block", "Manifest",
    "Checked", "Boot", "Description",
)


def row(item: Listed) -> tuple[str, ...]:
    properties = item.vdisk.properties
    return (
        item.vdisk.name,
        human_size(item.vdisk.size),
        str(properties.mode),
        str(item.version) + ("" if item.state == "production" else f" ({item.state})"),
        "on" if properties.maintenance else "off",
        "any server" if properties.load_balancing else f"only {properties.fixed_server}",
        str(properties.subnet_affinity),
        str(properties.block_size),
        _manifest_text(item),
        checked_text(item),
        "yes" if item.bootable else "-",
        properties.description,
    )


def advice(listed: Sequence[Listed]) -> list[str]:
    """Lines after the table: how to make the manifests that are missing (one line for many)."""
    missing = [item for item in listed if item.problem.startswith(_NO_MANIFEST)]
    if len(missing) == 1:
        return [f"{missing[0].vdisk.key}: {missing[0].problem}"]
    if not missing:
        return []
    return [
        f"{len(missing)} images have {_NO_MANIFEST} (Manifest: none yet); make each with "
        "`pvsctl vdisk manifest NAME --store DIR` (it reads the whole image), or let pvsd make "
        "them when it serves the store"
    ]


def _manifest_text(item: Listed) -> str:
    manifest = item.manifest
    if manifest is None:
        return "none yet" if item.problem.startswith(_NO_MANIFEST) else item.problem
    return (
        f"v{manifest.version} {mfc.format_ns(manifest.created_ns)}, "
        f"{manifest.block_size // 1024} KiB blocks, root {manifest.root.hex()[:16]}"
    )


def checked_text(item: Listed) -> str:
    manifest = item.manifest
    if manifest is None:
        return "-"
    if item.size_differs:
        return (
            f"DAMAGED: the image is {item.vdisk.size} bytes, its manifest says {manifest.size}"
        )
    if item.verified:
        return "matches its manifest"
    if item.recorded:
        return "not since it changed (pvsctl vdisk verify)"
    return "not yet (pvsctl vdisk verify)"


def to_json(item: Listed) -> dict[str, object]:
    vdisk, manifest = item.vdisk, item.manifest
    return {
        "name": vdisk.name,
        "version": item.version,
        "state": str(item.state),
        "path": str(vdisk.path),
        "store": str(vdisk.store.path),
        "size": vdisk.size,
        "properties": vdisk.properties.to_mapping(),
        "identity": manifest.identity.to_json() if manifest is not None else None,
        "manifest": mfc.manifest_json(manifest) if manifest is not None else None,
        "manifest_problem": item.problem or None,
        "verified": item.verified,
        "boot": item.bootable,
        "boot_files": {
            str(kind): str(state.real) if state.real is not None else None
            for kind, state in item.boot_files.items()
        },
        "damage": {
            "first_offset": min(vdisk.size, manifest.size) // manifest.block_size
            * manifest.block_size,
            "found_by": "size",
        } if manifest is not None and item.size_differs else None,
    }
