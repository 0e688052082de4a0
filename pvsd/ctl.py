"""pvsctl: the administrator's console.

Every command group registers its subcommands in one ``_add_*_commands`` function listed in
`_COMMAND_GROUPS`: ``vdisk`` here works on a local store; the site-wide commands (servers,
vdisks, targets, stop-stream, start-stream, site) are in `pvsd.console.commands` and talk to any
server's admin API (``--admin HOST:PORT --key-file FILE``). A handler takes the parsed arguments
and either returns or raises `UserError`. `main` turns user errors into one line on stderr and
exit code 2, because a traceback tells an administrator nothing they can act on.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from pvs_protocol.modes import Mode, SubnetAffinity
from pvsd import logs
from pvsd.config import ConfigError
from pvsd.console import UserError
from pvsd.console.client import add_global_options, admin_requested, options_parser
from pvsd.console.commands import add_site_commands, set_through_admin
from pvsd.console.tables import human_size
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
        args.handler(args)
    except (UserError, InvalidName, PropertiesError, ConfigError, OSError) as error:
        print(f"pvsctl: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


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
    create.set_defaults(handler=_create)

    import_ = commands.add_parser("import", help="copy or convert a disk image into a store")
    import_.add_argument("file", type=Path)
    import_.add_argument("--name", required=True)
    import_.add_argument("--store", required=True, type=Path)
    import_.add_argument("--format", choices=FORMATS, default="auto")
    import_.add_argument("--mode", choices=modes, default=str(Mode.standard))
    import_.add_argument("--description", default="")
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
    set_.set_defaults(handler=_set)

    show = commands.add_parser(
        "show", parents=[options_parser(connection=False)],
        help="list vDisks in local stores with properties and identity",
    )
    show.add_argument("name", nargs="?")
    show.add_argument("--store", required=True, type=Path, action="append", help="repeatable")
    show.set_defaults(handler=_show)


_COMMAND_GROUPS: tuple[
    Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...
] = (_add_vdisk_commands, add_site_commands)


def _create(args: argparse.Namespace) -> None:
    image = _new_image(args.store, args.name)
    size = parse_size(args.size)
    save_properties(
        properties_path(image), VDiskProperties(Mode(args.mode), description=args.description)
    )
    with _staged(image) as temporary:
        os.truncate(temporary, size)
    print(f"created vDisk {args.name}: {human_size(size)}, {args.mode}, in {image}")


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
        # Keeping the source's mtime (as cp -p does) makes the same file imported on two
        # servers two identical replicas.
        source_stat = source.stat()
        os.utime(temporary, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))
        save_properties(
            properties_path(image), VDiskProperties(Mode(args.mode), description=args.description)
        )
    print(
        f"imported {source} ({image_format}) as vDisk {args.name}: {human_size(size)}, in {image}"
    )


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
    }
    changes = {key: value for key, value in options.items() if value is not None}
    if not changes:
        raise UserError("nothing to change; pass at least one option, e.g. --version 2")
    if args.store is None:
        set_through_admin(args, changes)
        return
    store = _store_directory(args.store)
    image = store / f"{args.name}.img"
    if not image.exists():
        raise UserError(f"no vDisk {args.name} in {store}; see `pvsctl vdisk show --store {store}`")
    path = properties_path(image)
    current = load_properties(path)  # a broken file is reported as it is, by file and key
    try:
        updated = dataclasses.replace(current, **changes)
    except PropertiesError as error:
        option = "--" + error.key.replace("_", "-")
        raise UserError(f"cannot change vDisk {args.name}: {option} {error.problem}") from None
    save_properties(path, updated)
    shown = {key: _on_off_text(value) for key, value in changes.items()}
    print(f"vDisk {args.name}: " + ", ".join(f"{key}={value}" for key, value in shown.items()))


def _show(args: argparse.Namespace) -> None:
    catalog = Catalog(Store(_store_directory(path)) for path in args.store)
    try:
        asyncio.run(catalog.refresh())
    finally:
        catalog.close()
    if args.name is not None and args.name not in catalog:
        stores = " ".join(f"--store {path}" for path in args.store)
        raise UserError(f"no vDisk {args.name} is served from {stores}; check the name")
    vdisks = [catalog[args.name]] if args.name is not None else list(catalog.values())
    if args.json:
        print(json.dumps([_vdisk_json(vdisk) for vdisk in vdisks], indent=2))
        return
    table = Table(*_COLUMNS)
    for vdisk in vdisks:
        properties = vdisk.properties
        table.add_row(
            vdisk.name,
            human_size(vdisk.size),
            str(properties.mode),
            str(properties.version),
            "on" if properties.maintenance else "off",
            "any server" if properties.load_balancing else f"only {properties.fixed_server}",
            str(properties.subnet_affinity),
            str(properties.block_size),
            vdisk.identity.short if vdisk.identity else "(not available)",
            properties.description,
        )
    Console().print(table)


_COLUMNS = (
    "Name",
    "Size",
    "Mode",
    "Version",
    "Maint.",
    "Served by",
    "Affinity",
    "Block",
    "Identity",
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
    try:
        os.chmod(temporary, 0o644)
        yield temporary
        try:
            os.link(temporary, image)
        except FileExistsError:
            raise UserError(f"{image} appeared meanwhile; nothing was replaced") from None
    finally:
        temporary.unlink(missing_ok=True)


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


def _vdisk_json(vdisk: VDisk) -> dict[str, object]:
    return {
        "name": vdisk.name,
        "path": str(vdisk.path),
        "store": str(vdisk.store.path),
        "size": vdisk.size,
        "properties": vdisk.properties.to_mapping(),
        "identity": vdisk.identity.to_json() if vdisk.identity else None,
    }


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _on_off_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
