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
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from pvs_protocol import manifest as mf
from pvs_protocol import sizes
from pvs_protocol.modes import Mode, SubnetAffinity
from pvsd import logs
from pvsd.config import ConfigError
from pvsd.console import UserError, stores
from pvsd.console import manifests as mfc
from pvsd.console.client import add_global_options, admin_requested, options_parser
from pvsd.console.commands import add_site_commands, set_through_admin
from pvsd.console.output import print_table
from pvsd.console.progress import meter
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
from pvsd.version import add_version_option

SECTOR = 512
COPY_CHUNK = 1024 * 1024
FORMATS = ("auto", "raw", "qcow2", "vhdx", "vmdk", "vpc")
_MAGIC = ((b"QFI\xfb", "qcow2"), (b"vhdxfile", "vhdx"), (b"KDMV", "vmdk"), (b"conectix", "vpc"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed by argparse
        return exit_request.code if isinstance(exit_request.code, int) else 2
    # Warnings only, one line each, on stderr (-v for more): `show --json` output stays clean.
    logs.configure_command("pvsctl", getattr(args, "verbose", 0))
    try:
        code = args.handler(args)
    except BrokenPipeError:  # `pvsctl ... | head`: the reader has all it wanted
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except (UserError, InvalidName, PropertiesError, ConfigError, OSError) as error:
        print(f"pvsctl: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every command writes its files under temporary names and renames them into place
        # last, so nothing half-made is left behind.
        print("pvsctl: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds no closed pipe
    (and prints no error about it)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvsctl", description="Administer a pvs site.")
    add_global_options(parser)
    add_version_option(parser)
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for add_commands in _COMMAND_GROUPS:
        add_commands(groups)
    add_verbose_option(parser)
    return parser


def _add_vdisk_commands(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vdisk = groups.add_parser("vdisk", help="create, import, change and list vDisks")
    commands = vdisk.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modes = [str(mode) for mode in Mode]

    create = commands.add_parser("create", help="create an empty (sparse) vDisk")
    create.add_argument("name", help="the new vDisk's name (letters, digits, '.', '_', '-')")
    create.add_argument("--size", required=True, help="bytes, or with a unit: 64M, 1G, 10GiB")
    create.add_argument("--store", required=True, type=Path, help=_STORE_HELP)
    create.add_argument("--mode", choices=modes, default=str(Mode.standard), help=_MODE_HELP)
    create.add_argument("--description", default="", help=_DESCRIPTION_HELP)
    _block_size_option(create)
    create.set_defaults(handler=_create)

    import_ = commands.add_parser("import", help="copy or convert a disk image into a store")
    import_.add_argument("file", type=Path, help="the disk image to import")
    import_.add_argument("--name", required=True, help="the new vDisk's name")
    import_.add_argument("--store", required=True, type=Path, help=_STORE_HELP)
    import_.add_argument(
        "--format", choices=FORMATS, default="auto",
        help="the image's format; other than raw needs qemu-img (default: recognised)",
    )
    import_.add_argument("--mode", choices=modes, default=str(Mode.standard), help=_MODE_HELP)
    import_.add_argument("--description", default="", help=_DESCRIPTION_HELP)
    _block_size_option(import_)
    import_.set_defaults(handler=_import)

    set_ = commands.add_parser(
        "set", parents=[options_parser()],
        help="change a vDisk's properties: in one store (--store), or on every server (--admin)",
    )
    set_.add_argument("name", help="the vDisk's name")
    set_.add_argument("--store", type=Path, help="edit the properties file in this store")
    set_.add_argument("--mode", choices=modes, help=_MODE_HELP)
    set_.add_argument(
        "--maintenance", choices=("on", "off"),
        help="on while the image is being updated: ordinary targets do not get it",
    )
    set_.add_argument(
        "--version", type=int,
        help="the version number of the same bytes (a new manifest identity; every copy on "
        "every server must carry the same number)",
    )
    set_.add_argument(
        "--load-balancing", choices=("on", "off"),
        help="on: any server with an identical copy serves it; off: only --fixed-server",
    )
    set_.add_argument(
        "--fixed-server", metavar="SERVER",
        help="the server that serves it while load balancing is off",
    )
    set_.add_argument(
        "--subnet-affinity", choices=[str(value) for value in SubnetAffinity],
        help="none: any server; best_effort: prefer one on the target's subnet; fixed: only "
        "those",
    )
    set_.add_argument("--description", help=_DESCRIPTION_HELP)
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
    show.add_argument("name", nargs="?", help="only this vDisk's versions (default: all)")
    show.add_argument("--store", required=True, type=Path, action="append", help="repeatable")
    show.set_defaults(handler=_show)

    verify = commands.add_parser(
        "verify", help="check a local copy against its manifest; exit 1 if it is damaged"
    )
    verify.add_argument("name", help="the vDisk's name")
    verify.add_argument("--store", type=Path, help=f"the store (default: ${mfc.STORE_ENV})")
    verify.add_argument("--version", type=int, help="which version (default: the newest)")
    verify.set_defaults(handler=_verify)

    manifest = commands.add_parser(
        "manifest", parents=[options_parser(connection=False)],
        help="make the manifest from the image's current content: a new version",
    )
    manifest.add_argument("name", help="the vDisk's name")
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


_STORE_HELP = "the store directory to put it in"
_MODE_HELP = (
    "standard: read-only, shared by many targets, each keeping its writes in its own cache; "
    "private: one target at a time, writing into the image (default: standard)"
)
_DESCRIPTION_HELP = "free text for administrators"


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _block_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--block-size", type=mfc.parse_block_size, default=mf.DEFAULT_BLOCK_SIZE,
        help="manifest digest block size: the unit a target checks, 4K to 1M (default 16K)",
    )


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """``-v``/``--verbose`` before the command and after it (``pvsctl vdisk manifest x -v``):
    it is what someone adds to a command line that just went wrong."""
    text = "show more of what happens on stderr: -v info events, -vv debug (default: warnings)"
    parser.add_argument("-v", "--verbose", action="count", default=0, help=text)
    for command in _commands_of(parser):
        command.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=text
        )


def _commands_of(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command's parser below ``parser`` (each parser once, also when aliased)."""
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if id(command) not in seen:
                    seen.add(id(command))
                    if not any(isinstance(a, argparse._SubParsersAction)
                               for a in command._actions):
                        yield command
                    yield from _commands_of(command)


_COMMAND_GROUPS: tuple[
    Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...
] = (_add_vdisk_commands, add_site_commands, add_rebalance_commands)


def _create(args: argparse.Namespace) -> None:
    image = _new_image(args.store, args.name)
    size = parse_size(args.size)
    properties = VDiskProperties(Mode(args.mode), description=args.description)
    with _staged(image) as temporary:
        save_properties(properties_path(image), properties)
        os.truncate(temporary, size)
        # before the image appears: pvsd never adopts it
        manifest = mfc.write_empty_manifest(
            image, size, args.block_size, properties.version, time.time_ns(),
            label=f"manifest of {args.name}",
        )
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
    """List without hashing anything (`pvsd.console.stores`): instant for any image size."""
    listed = stores.list_stores([_store_directory(path) for path in args.store], args.name)
    if args.json:
        print(json.dumps([stores.to_json(item) for item in listed], indent=2))
        return
    if not listed:
        print("no vDisks in " + ", ".join(str(path) for path in args.store))
        return
    table = Table(*stores.COLUMNS)
    for item in listed:
        table.add_row(*stores.row(item))
    print_table(table)
    if args.name is not None:
        for item in listed:
            if item.manifest is not None:
                print(f"manifest: {mfc.describe(item.manifest)}")
    for line in stores.advice(listed):
        print(line)


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
        current = None
        with contextlib.suppress(UserError):  # a damaged manifest is being replaced
            current = mfc.read_header(image)
        block_size = current.block_size if current is not None else mf.DEFAULT_BLOCK_SIZE
    manifest = mfc.make_manifest(
        image, version, time.time_ns(), block_size, label=f"manifest of {args.name}"
    )
    mfc.save_manifest(image, manifest)
    save_properties(path, properties)
    if getattr(args, "json", False):
        print(json.dumps(mfc.manifest_json(manifest), indent=2))
        return
    print(f"vDisk {args.name}: new manifest: {mfc.describe(manifest)}")


def parse_size(text: str) -> int:
    """Bytes as every tool reads them (`pvs_protocol.sizes`: 64M and 10GiB binary, 10GB
    decimal), checked for what a vDisk can be."""
    try:
        size = sizes.parse_size(text)
    except sizes.SizeError as error:
        raise UserError(str(error)) from None
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
    # the manifest and properties written for an image never made (an error, Ctrl-C) go too
    companions = [path for path in (manifest_path(image), properties_path(image))
                  if not path.exists()]
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
        if not linked:
            for path in companions:
                path.unlink(missing_ok=True)


def _copy_raw(source: Path, target: Path) -> None:
    """Copy in chunks, seeking over all-zero ones so that holes stay holes."""
    size = source.stat().st_size
    with (
        source.open("rb") as reader, target.open("r+b") as writer,
        meter(f"importing {source.name}", size) as update,
    ):
        while chunk := reader.read(COPY_CHUNK):
            if chunk.count(0) == len(chunk):
                writer.seek(len(chunk), os.SEEK_CUR)
            else:
                writer.write(chunk)
            update(writer.tell())
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


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _on_off_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
