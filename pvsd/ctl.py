"""pvsctl: the administrator's console.

Every command group registers its subcommands in one ``_add_*_commands`` function listed in
`_COMMAND_GROUPS`: ``vdisk`` here works on a local store, except ``vdisk versions``, ``vdisk
version ...`` (`pvsd.console.versions`) and ``vdisk replicate`` / ``replication``
(`pvsd.console.replicate`); the site-wide commands (servers, vdisks, targets, stop-stream,
start-stream, site) are in `pvsd.console.commands`, ``rebalance`` in `pvsd.console.rebalance`.
All of those talk to any server's admin API (``--admin HOST:PORT --key-file FILE``). A handler
takes the parsed arguments and returns (None or an exit code: ``vdisk verify`` returns 1 for a
damaged copy) or raises `UserError`. `main` turns user errors into one line on stderr and exit
code 2, because a traceback tells an administrator nothing they can act on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from pvs_protocol import manifest as mf
from pvs_protocol.modes import Mode, SubnetAffinity
from pvsd import logs
from pvsd.config import ConfigError
from pvsd.console import UserError
from pvsd.console import manifests as mfc
from pvsd.console.client import add_global_options, admin_requested, options_parser
from pvsd.console.commands import add_site_commands, set_through_admin
from pvsd.console.rebalance import add_rebalance_commands
from pvsd.console.replicate import add_replicate_commands
from pvsd.console.tables import human_size
from pvsd.console.versions import add_version_commands
from pvsd.manifest import manifest_path
from pvsd.names import InvalidName, validate_name
from pvsd.properties import (
    PropertiesError,
    VDiskProperties,
    load_properties,
    properties_path,
    save_properties,
)
from pvsd.store import Catalog, Store, VDisk

SECTOR = 512
COPY_CHUNK = 1024 * 1024
FORMATS = ("auto", "raw", "qcow2", "vhdx", "vmdk", "vpc")
_UNITS: dict[str, int] = {"": 1, "b": 1} | {
    unit: factor
    for power, letter in enumerate("kmgt", start=1)
    for unit, factor in (
        (letter, 1024**power),
        (f"{letter}ib", 1024**power),
        (f"{letter}b", 1000**power),
    )
}
_MAGIC = ((b"QFI\xfb", "qcow2"), (b"vhdxfile", "vhdx"), (b"KDMV", "vmdk"), (b"conectix", "vpc"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed by argparse
        return exit_request.code if isinstance(exit_request.code, int) else 2
    logs.configure()  # to stderr, so that `show --json` output stays clean
    try:
        code = args.handler(args)
    except (UserError, InvalidName, PropertiesError, ConfigError, OSError) as error:
        print(f"pvsctl: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvsctl", description="Administer a pvs site.")
    add_global_options(parser)
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for add_commands in _COMMAND_GROUPS:
        add_commands(groups)
    return parser


def _add_vdisk_commands(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vdisk = groups.add_parser("vdisk", help="create, import, change and list vDisks")
    commands = vdisk.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modes = [str(mode) for mode in Mode]

    create = commands.add_parser("create", help="create an empty (sparse) vDisk")
    create.add_argument("name")
    create.add_argument("--size", required=True, help="bytes, or with a unit: 64M, 1G, 10GiB")
    create.add_argument("--store", required=True, type=Path)
    create.add_argument("--mode", choices=modes, default=str(Mode.standard))
    create.add_argument("--description", default="")
    _block_size_option(create)
    create.set_defaults(handler=_create)

    import_ = commands.add_parser("import", help="copy or convert a disk image into a store")
    import_.add_argument("file", type=Path)
    import_.add_argument("--name", required=True)
    import_.add_argument("--store", required=True, type=Path)
    import_.add_argument("--format", choices=FORMATS, default="auto")
    import_.add_argument("--mode", choices=modes, default=str(Mode.standard))
    import_.add_argument("--description", default="")
    _block_size_option(import_)
    import_.set_defaults(handler=_import)

    set_ = commands.add_parser(
        "set", parents=[options_parser()],
        help="change a vDisk's properties: in one store (--store), or on every server (--admin)",
    )
    set_.add_argument("name")
    set_.add_argument("--store", type=Path, help="edit the properties file in this store")
    set_.add_argument("--mode", choices=modes)
    set_.add_argument("--maintenance", choices=("on", "off"))
    set_.add_argument("--version", type=int)
    set_.add_argument("--load-balancing", choices=("on", "off"))
    set_.add_argument("--fixed-server")
    set_.add_argument("--subnet-affinity", choices=[str(value) for value in SubnetAffinity])
    set_.add_argument("--description")
    set_.add_argument(
        "--test-devices", type=_patterns, metavar="ID,...",
        help="device ids or globs (lab-*) that get test versions; '' for none",
    )
    set_.add_argument(
        "--maintenance-devices", type=_patterns, metavar="ID,...",
        help="device ids or globs that may write a maintenance version; '' for none",
    )
    set_.add_argument(
        "--force", action="store_true",
        help="make a change that cuts off streaming targets (they are named without it)",
    )
    set_.set_defaults(handler=_set)

    show = commands.add_parser(
        "show", parents=[options_parser(connection=False)],
        help="list vDisks in local stores with properties and identity",
    )
    show.add_argument("name", nargs="?")
    show.add_argument("--store", required=True, type=Path, action="append", help="repeatable")
    show.set_defaults(handler=_show)

    verify = commands.add_parser(
        "verify", help="check a local copy against its manifest; exit 1 if it is damaged"
    )
    verify.add_argument("name")
    verify.add_argument("--store", type=Path, help=f"the store (default: ${mfc.STORE_ENV})")
    verify.add_argument("--version", type=int, help="which version (default: the newest)")
    verify.set_defaults(handler=_verify)

    manifest = commands.add_parser(
        "manifest", parents=[options_parser(connection=False)],
        help="make the manifest from the image's current content: a new version",
    )
    manifest.add_argument("name")
    manifest.add_argument("--store", type=Path, help=f"the store (default: ${mfc.STORE_ENV})")
    manifest.add_argument(
        "--version", type=int, help="version number (default: the one in the properties file)"
    )
    manifest.add_argument(
        "--block-size", type=mfc.parse_block_size,
        help="digest block size, 4K to 1M (default: the current manifest's, else 16K)",
    )
    manifest.set_defaults(handler=_manifest)
    add_version_commands(commands)
    add_replicate_commands(commands)


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _block_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-size", type=mfc.parse_block_size, default=mf.DEFAULT_BLOCK_SIZE,
        help="manifest digest block size: the unit a target checks, 4K to 1M (default 16K)",
    )


_COMMAND_GROUPS: tuple[
    Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...
] = (_add_vdisk_commands, add_site_commands, add_rebalance_commands)


def _create(args: argparse.Namespace) -> None:
    image = _new_image(args.store, args.name)
    size = parse_size(args.size)
    properties = VDiskProperties(Mode(args.mode), description=args.description)
    save_properties(properties_path(image), properties)
    manifest = mfc.empty_manifest(size, args.block_size, properties.version, time.time_ns())
    with _staged(image) as temporary:
        os.truncate(temporary, size)
        mfc.save_manifest(image, manifest)  # before the image appears: pvsd never adopts it
    print(f"created vDisk {args.name}: {human_size(size)}, {args.mode}, in {image}")
    print(f"manifest: {mfc.describe(manifest)}")


def _import(args: argparse.Namespace) -> None:
    source: Path = args.file
    if not source.is_file():
        raise UserError(f"cannot import {source}: not a readable file; check the path")
    image = _new_image(args.store, args.name)
    image_format = _detect_format(source) if args.format == "auto" else args.format
    with _staged(image) as temporary:
        if image_format == "raw":
            _copy_raw(source, temporary)
        else:
            _convert(source, temporary, image_format)
        size = temporary.stat().st_size
        if size % SECTOR:
            raise UserError(
                f"cannot import {source}: {size} bytes is not a multiple of {SECTOR};"
                f" pad it with `truncate -s %{SECTOR} {source}` first"
            )
        # The manifest is stamped with the source's mtime (kept on the image too, as cp -p
        # does), so the same file imported on two servers makes two identical replicas.
        source_stat = source.stat()
        os.utime(temporary, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))
        properties = VDiskProperties(Mode(args.mode), description=args.description)
        manifest = mfc.make_manifest(
            temporary, properties.version, source_stat.st_mtime_ns, args.block_size,
            label=f"manifest of {args.name}",
        )
        save_properties(properties_path(image), properties)
        mfc.save_manifest(image, manifest)  # before the image appears: pvsd never adopts it
    print(
        f"imported {source} ({image_format}) as vDisk {args.name}: {human_size(size)}, in {image}"
    )
    print(f"manifest: {mfc.describe(manifest)}")


def _set(args: argparse.Namespace) -> None:
    validate_name(args.name)
    if args.store is not None and args.admin:
        raise UserError(
            "give either --store (edit the file in that store) or --admin (change it on every "
            "server of the site), not both"
        )
    if args.store is None and not admin_requested(args):
        raise UserError(
            "where? give --admin HOST:PORT to change it on every server of the site, or --store "
            "DIR to edit one store's file"
        )
    options: dict[str, Any] = {
        "mode": args.mode and Mode(args.mode),
        "maintenance": _on_off(args.maintenance),
        "version": args.version,
        "load_balancing": _on_off(args.load_balancing),
        "fixed_server": args.fixed_server,
        "subnet_affinity": args.subnet_affinity and SubnetAffinity(args.subnet_affinity),
        "description": args.description,
        "test_devices": args.test_devices,
        "maintenance_devices": args.maintenance_devices,
    }
    changes = {key: value for key, value in options.items() if value is not None}
    if not changes:
        raise UserError("nothing to change; pass at least one option, e.g. --version 2")
    if args.store is None:
        set_through_admin(args, changes | ({"force": True} if args.force else {}))
        return
    store = _store_directory(args.store)
    image = mfc.existing_image(store, args.name)
    if "version" in changes and image.name != f"{args.name}.img":
        raise UserError(
            f"{args.name} has versions of its own ({image.name}): make a new one with "
            f"'pvsctl vdisk version new {args.name}' instead of renumbering"
        )
    path = properties_path(image)
    current = load_properties(path)  # a broken file is reported as it is, by file and key
    try:
        updated = dataclasses.replace(current, **changes)
    except PropertiesError as error:
        option = "--" + error.key.replace("_", "-")
        raise UserError(f"cannot change vDisk {args.name}: {option} {error.problem}") from None
    manifest = None
    if "version" in changes:  # a new version of the same bytes: a new manifest identity
        mfc.refuse_while_written(image, args.name, f"make version {changes['version']}")
        manifest = mfc.restamp(image, changes["version"], time.time_ns())
    save_properties(path, updated)
    shown = {key: _on_off_text(value) for key, value in changes.items()}
    print(f"vDisk {args.name}: " + ", ".join(f"{key}={value}" for key, value in shown.items()))
    if manifest is not None:
        print(f"manifest: {mfc.describe(manifest)}")
    elif "version" in changes:
        print(
            f"{args.name} has no manifest yet: pvsd makes one as version {changes['version']} "
            f"when it finds the image, or make it now: pvsctl vdisk manifest {args.name} "
            f"--store {store}"
        )


def _show(args: argparse.Namespace) -> None:
    catalog = Catalog(Store(_store_directory(path)) for path in args.store)
    try:
        asyncio.run(catalog.refresh())
    finally:
        catalog.close()
    if args.name is not None and not catalog.versions(args.name):
        stores = " ".join(f"--store {path}" for path in args.store)
        raise UserError(f"no vDisk {args.name} is served from {stores}; check the name")
    vdisks = (
        list(catalog.versions(args.name).values()) if args.name is not None
        else sorted(catalog.values(), key=lambda v: (v.name, v.version))
    )
    manifests = {vdisk.key: _manifest_or_error(vdisk) for vdisk in vdisks}
    if args.json:
        print(json.dumps([_vdisk_json(vdisk, manifests[vdisk.key]) for vdisk in vdisks], indent=2))
        return
    table = Table(*_COLUMNS)
    for vdisk in vdisks:
        properties = vdisk.properties
        manifest = manifests[vdisk.key]
        table.add_row(
            vdisk.name,
            human_size(vdisk.size),
            str(properties.mode),
            str(vdisk.version) + ("" if vdisk.state == "production" else f" ({vdisk.state})"),
            "on" if properties.maintenance else "off",
            "any server" if properties.load_balancing else f"only {properties.fixed_server}",
            str(properties.subnet_affinity),
            str(properties.block_size),
            _manifest_text(manifest),
            _damage_text(vdisk),
            properties.description,
        )
    Console().print(table)
    if args.name is not None:
        for vdisk in vdisks:
            manifest = manifests[vdisk.key]
            if isinstance(manifest, mf.Manifest):
                print(f"manifest: {mfc.describe(manifest)}")


def _verify(args: argparse.Namespace) -> int:
    validate_name(args.name)
    image = mfc.existing_image(mfc.store_directory(args.store), args.name, args.version)
    result = mfc.verify(image, args.name)
    print(result.lines[0])
    for line in result.lines[1:]:
        print(line, file=sys.stderr)
    return 0 if result.good else 1


def _manifest(args: argparse.Namespace) -> None:
    validate_name(args.name)
    store = mfc.store_directory(args.store)
    image = mfc.existing_image(store, args.name)
    mfc.refuse_while_written(image, args.name, "make a new manifest")
    path = properties_path(image)
    properties = load_properties(path)
    version = properties.version if args.version is None else args.version
    if args.version is not None:
        try:
            properties = dataclasses.replace(properties, version=args.version)
        except PropertiesError as error:
            raise UserError(f"cannot make version {args.version}: {error.problem}") from None
    block_size = args.block_size
    if block_size is None:
        current = _manifest_or_error(_Image(image))
        block_size = (
            current.block_size if isinstance(current, mf.Manifest) else mf.DEFAULT_BLOCK_SIZE
        )
    manifest = mfc.make_manifest(
        image, version, time.time_ns(), block_size, label=f"manifest of {args.name}"
    )
    mfc.save_manifest(image, manifest)
    save_properties(path, properties)
    if getattr(args, "json", False):
        print(json.dumps(mfc.manifest_json(manifest), indent=2))
        return
    print(f"vDisk {args.name}: new manifest: {mfc.describe(manifest)}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Image:
    path: Path


def _manifest_or_error(vdisk: VDisk | _Image) -> mf.Manifest | str:
    """The manifest beside a listed image, or why there is none to show."""
    try:
        manifest = mfc.read_manifest(vdisk.path)
    except UserError as error:
        return str(error)
    return manifest if manifest is not None else "none yet (pvsd adopts the image)"


def _manifest_text(manifest: mf.Manifest | str) -> str:
    if isinstance(manifest, str):
        return manifest
    return (
        f"v{manifest.version} {mfc.format_ns(manifest.created_ns)}, "
        f"{manifest.block_size // 1024} KiB blocks, root {manifest.root.hex()[:16]}"
    )


def _damage_text(vdisk: VDisk) -> str:
    damage = vdisk.damage
    if damage is None:
        return "-"
    count = damage.bad_blocks
    return f"DAMAGED at offset {damage.first_offset} ({count} bad block{'s' * (count != 1)})"


_COLUMNS = (
    "Name",
    "Size",
    "Mode",
    "Version",
    "Maint.",
    "Served by",
    "Affinity",
    "Block",
    "Manifest",
    "Damage",
    "Description",
)


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``64M``, ``1G``, ``10GiB`` (K/M/G/T binary) or ``10GB`` (decimal)."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if match is None or match[2].lower() not in _UNITS:
        raise UserError(f"size {text!r} is not understood; write e.g. 512, 64M, 1G or 10GiB")
    size = int(match[1]) * _UNITS[match[2].lower()]
    if size <= 0 or size % SECTOR:
        raise UserError(f"size {text} is {size} bytes; use a positive multiple of {SECTOR}")
    return size


def _new_image(store: Path, name: str) -> Path:
    image = _store_directory(store) / f"{validate_name(name)}.img"
    if image.exists() or image.is_symlink():
        raise UserError(f"vDisk {name} already exists as {image}; choose another name")
    return image


def _store_directory(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"store {path} is not a directory; create it (mkdir -p {path}) first")
    return path


@contextlib.contextmanager
def _staged(image: Path) -> Iterator[Path]:
    """Build the image under a hidden name, then link it into place.

    A watching pvsd never sees a half-written image, and os.link, unlike rename, refuses to
    replace an image that appeared in the meantime.
    """
    descriptor, name = tempfile.mkstemp(dir=image.parent, prefix=f".{image.name}.")
    os.close(descriptor)
    temporary = Path(name)
    manifest = manifest_path(image)
    manifest_before = manifest.exists()
    linked = False
    try:
        os.chmod(temporary, 0o644)
        yield temporary
        try:
            os.link(temporary, image)
        except FileExistsError:
            raise UserError(f"{image} appeared meanwhile; nothing was replaced") from None
        linked = True
    finally:
        temporary.unlink(missing_ok=True)
        if not linked and not manifest_before:  # the manifest written for an image never made
            manifest.unlink(missing_ok=True)


def _copy_raw(source: Path, target: Path) -> None:
    """Copy in chunks, seeking over all-zero ones so that holes stay holes."""
    size = source.stat().st_size
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with source.open("rb") as reader, target.open("r+b") as writer, progress:
        task = progress.add_task(f"importing {source.name}", total=size)
        while chunk := reader.read(COPY_CHUNK):
            if chunk.count(0) == len(chunk):
                writer.seek(len(chunk), os.SEEK_CUR)
            else:
                writer.write(chunk)
            progress.advance(task, len(chunk))
        writer.truncate()
        os.fsync(writer.fileno())


def _detect_format(source: Path) -> str:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        image_format = _sniff_format(source)
        if image_format != "raw":
            raise UserError(f"{source} looks like {image_format}; {_INSTALL_QEMU}")
        return "raw"
    output = _run_qemu_img([qemu_img, "info", "--output=json", str(source)])
    return str(json.loads(output)["format"])


def _sniff_format(source: Path) -> str:
    """Recognise the common non-raw formats without qemu-img, so none is imported as raw."""
    with source.open("rb") as file:
        head = file.read(4096)
        file.seek(max(source.stat().st_size - 512, 0))
        footer = file.read(512)
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    return "vpc" if footer.startswith(b"conectix") else "raw"  # fixed VHDs have only a footer


def _convert(source: Path, target: Path, image_format: str) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise UserError(f"cannot convert {source} from {image_format}: {_INSTALL_QEMU}")
    show_progress = sys.stderr.isatty()
    command = [qemu_img, "convert", "-f", image_format, "-O", "raw", str(source), str(target)]
    if show_progress:
        command.insert(2, "-p")
    _run_qemu_img(command, progress=show_progress)
    with target.open("rb") as written:  # qemu-img does not fsync its output
        os.fsync(written.fileno())


def _run_qemu_img(command: list[str], *, progress: bool = False) -> str:
    result = subprocess.run(
        command,
        stdout=sys.stderr if progress else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
        raise UserError(f"qemu-img {command[1]} failed: {lines[-1]}; check the file and --format")
    return result.stdout or ""


_INSTALL_QEMU = "install qemu-img (apt install qemu-utils, or dnf install qemu-img)"


def _vdisk_json(vdisk: VDisk, manifest: mf.Manifest | str) -> dict[str, object]:
    damage = vdisk.damage
    return {
        "name": vdisk.name,
        "version": vdisk.version,
        "state": str(vdisk.state),
        "path": str(vdisk.path),
        "store": str(vdisk.store.path),
        "size": vdisk.size,
        "properties": vdisk.properties.to_mapping(),
        "identity": vdisk.identity.to_json() if vdisk.identity else None,
        "manifest": mfc.manifest_json(manifest) if isinstance(manifest, mf.Manifest) else None,
        "manifest_problem": manifest if isinstance(manifest, str) else None,
        "damage": None if damage is None else {
            "first_offset": damage.first_offset, "bad_blocks": damage.bad_blocks,
        },
    }


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _on_off_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
