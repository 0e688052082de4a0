"""Network boot: which files of a store boot a vDisk version, and the iPXE scripts that boot
it. Pure: names and text, no I/O (`pvsd.boot_http` serves them).

A version's kernel and initramfs live beside its image, named after the image's stem (``K``:
``deb@3`` for ``deb@3.img``, ``deb`` for a plain ``deb.img``):

    K.vmlinuz   the kernel
    K.initrd    the initramfs (with pvs-target, docs/diskless.md)
    K.cmdline   optional: one line of kernel arguments the administrator adds

They belong to the version, not to the vDisk: the root a kernel mounts must carry that kernel's
modules, so the script pins the exact version (``pvs.identity=``) whose kernel it names. The
store ignores these files (only ``.img`` files are images); new versions, deletions and
replication carry them along (`pvsd.version_files`, `pvsd.replicator`).

Whatever pvsd writes into a script is checked here, because iPXE and the kernel read it: a
script line is split into words at spaces, ``${...}`` is expanded, quotes are removed, and a
newline starts another command. Names, device ids and addresses are checked where they come
from; the administrator's K.cmdline is checked by `extra_arguments`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence

from pvs_protocol import addresses
from pvs_protocol.addresses import format_address
from pvsd.names import validate_device_id, validate_name

IMAGE_SUFFIX = ".img"
MAX_COMMAND_LINE = 2048
"""COMMAND_LINE_SIZE of x86 Linux: a longer command line is cut, silently, by the kernel."""
MAX_CMDLINE_FILE = 4096
"""A K.cmdline larger than this is refused unread (it could never fit)."""
MAX_SERVERS = 16
"""Servers named in ``pvs.servers`` (a target learns the others from SITE)."""
DEFAULT_HTTP_PORT = 80
_SAFE_EXTRA = re.compile(r"[A-Za-z0-9 !%()*+,./:;<=>?@\[\]^_{}~-]*")
"""Printable ASCII without quotes, backslash, ``$``, ``#``, ``&``, ``|`` and backquote: what
iPXE would expand, unquote or take for an operator, and what the kernel would unquote."""
RESERVED = ("root", "initrd", "pvs.vdisk", "pvs.servers", "pvs.identity", "pvs.device")
"""Kernel arguments pvsd writes itself, and ``root``: the initramfs makes the attached vDisk
the root device (a ``root=/dev/nbd0`` would also start Debian's own nbd-client script, which
cannot set it up). K.cmdline may not give them (``ip=`` it may: it replaces ``ip=dhcp``)."""


class BootFile(enum.StrEnum):
    """A version's boot files, by the name they have in a URL and as a suffix."""

    vmlinuz = "vmlinuz"
    initrd = "initrd"
    cmdline = "cmdline"

    @property
    def what(self) -> str:
        return {"vmlinuz": "kernel", "initrd": "initramfs", "cmdline": "kernel arguments"}[self]


SERVED = (BootFile.vmlinuz, BootFile.initrd)
"""The files served over HTTP (K.cmdline is read into the script instead)."""
SUFFIXES = tuple("." + kind for kind in BootFile)


class BootError(ValueError):
    """Something that cannot go into a boot script; the message says what and what to do."""


def stem_of(image_name: str) -> str:
    """``deb@3.img`` -> ``deb@3``: the stem the version's boot files are named after."""
    return image_name.removesuffix(IMAGE_SUFFIX)


def file_name(stem: str, kind: BootFile) -> str:
    """``deb@3`` and vmlinuz -> ``deb@3.vmlinuz``."""
    return f"{stem}.{kind}"


def file_names(stem: str) -> dict[BootFile, str]:
    """Every boot file a version with image stem ``stem`` may have."""
    return {kind: file_name(stem, kind) for kind in BootFile}


# -- what goes into a script ------------------------------------------------------------------


def request_host(header: str | None, fallback: str) -> str:
    """The ``HOST:PORT`` to write into URLs: the Host header the machine sent (the address it
    reached us at), when it is a plain host and port; else ``fallback``, the address of the
    listening socket the request came in on."""
    if header:
        try:
            host, port = addresses.parse_address(
                header, default_port=DEFAULT_HTTP_PORT, any_port=False
            )
        except addresses.AddressError:
            return fallback
        if header.strip().startswith(":"):  # no host at all: ":6912"
            return fallback
        return format_address(host, port)
    return fallback


def extra_arguments(text: str, where: str) -> str:
    """The administrator's K.cmdline, as one line of kernel arguments; `BootError` naming
    ``where`` (the file) if it cannot be written into a script safely."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        raise BootError(f"{where} has {len(lines)} lines: write the kernel arguments on one line")
    line = " ".join(lines[0].split()) if lines else ""
    if _SAFE_EXTRA.fullmatch(line) is None:
        bad = next(c for c in line if _SAFE_EXTRA.fullmatch(c) is None)
        raise BootError(
            f"{where} holds {bad!r}, which iPXE or the kernel would not pass on as written: "
            "use printable ASCII without quotes, backslashes, '$', '#', '&', '|' or '`'"
        )
    for word in line.split():
        key = word.partition("=")[0]
        if key in RESERVED:
            raise BootError(
                f"{where} gives {key}=, which pvsd writes itself (from the vDisk, the version "
                "and the device): remove it"
            )
    return line


@dataclasses.dataclass(frozen=True, slots=True)
class BootScript:
    """Everything an iPXE script for one device needs: where the files are and what the
    initramfs is told."""

    host: str
    """``HOST:PORT`` of the boot listener, as the machine reached it."""
    vdisk: str
    version: int
    servers: tuple[str, ...]
    """Stream addresses of the servers holding that exact version (pvs.servers)."""
    identity: str
    """`ReplicaIdentity.token` of the version (pvs.identity)."""
    device: str
    extra: str = ""
    """The administrator's arguments (K.cmdline, checked by `extra_arguments`)."""

    def url(self, kind: BootFile) -> str:
        return file_url(self.host, self.vdisk, self.version, kind)

    def kernel_arguments(self) -> str:
        """The command line the kernel gets; `BootError` if it would be cut."""
        validate_name(self.vdisk)
        validate_device_id(self.device)
        if not self.servers:
            raise BootError(f"no server streams {self.vdisk} version {self.version} now")
        for address in self.servers:
            _check_address(address)
        if not re.fullmatch(r"[0-9a-f-]+", self.identity):
            raise BootError(f"identity token {self.identity!r} is not one")
        extra = self.extra.split()
        words = [
            "initrd=initrd",
            *([] if any(w.startswith("ip=") for w in extra) else ["ip=dhcp"]),
            f"pvs.vdisk={self.vdisk}",
            f"pvs.servers={','.join(self.servers[:MAX_SERVERS])}",
            f"pvs.identity={self.identity}",
            f"pvs.device={self.device}",
            *extra,
        ]
        line = " ".join(words)
        if len(line) >= MAX_COMMAND_LINE:
            raise BootError(
                f"the kernel command line would be {len(line)} characters, over the kernel's "
                f"{MAX_COMMAND_LINE - 1}: shorten the version's .cmdline file"
            )
        return line

    def render(self) -> str:
        """The script: the kernel with its arguments, the initramfs, boot."""
        return (
            "#!ipxe\n"
            f"kernel {self.url(BootFile.vmlinuz)} {self.kernel_arguments()}\n"
            f"initrd --name initrd {self.url(BootFile.initrd)}\n"
            "boot\n"
        )


def chain_script(host: str, vdisk: str) -> str:
    """The script for a fixed DHCP bootfile URL: it asks again with the machine's MAC as its
    device id (iPXE expands ``${mac:hexhyp}`` to 52-54-00-12-34-56), which then picks the
    version as that device's login would."""
    validate_name(vdisk)
    return (
        "#!ipxe\n"
        f"echo pvs: {vdisk} for device ${{mac:hexhyp}}\n"
        f"chain http://{host}/boot/{vdisk}.ipxe?device=${{mac:hexhyp}}\n"
    )


def file_url(host: str, vdisk: str, version: int, kind: BootFile) -> str:
    return f"http://{host}/boot/{vdisk}/{version}/{kind}"


def placement_order(servers: Sequence[tuple[str, str]], me: str) -> tuple[str, ...]:
    """``(name, address)`` of the servers holding the version -> their addresses, this server
    first, then by name (every server writes the same list), at most `MAX_SERVERS`."""
    ordered = sorted(servers, key=lambda pair: (pair[0] != me, pair[0]))
    return tuple(address for _name, address in ordered[:MAX_SERVERS])


def own_address(advertised: str, host: str) -> str:
    """This server's stream address as a booting machine can use it: one that names every
    interface (``0.0.0.0:6910``: a server alone, listening everywhere, advertising nothing)
    becomes the host the machine reached the boot listener at, with the stream port."""
    try:
        stream_host, port = addresses.parse_address(advertised)
        boot_host = addresses.parse_address(host, default_port=DEFAULT_HTTP_PORT).host
    except addresses.AddressError:
        return advertised
    if stream_host in ("0.0.0.0", "::", ""):
        return format_address(boot_host, port)
    return advertised


def _check_address(address: str) -> None:
    try:
        addresses.parse_address(address, default_port=None, any_port=False)
    except addresses.AddressError as error:
        raise BootError(f"server address {address!r}: {error}") from None
