"""Names: the one rule for vDisk names (from the store directory, the console and the network)
and for server names (from the configuration, the console and the admin API).

A vDisk name becomes a file name in the store (``NAME.img``), so anything that could climb out
of the directory, hide a file or confuse a shell is refused here rather than escaped later. A
server name is shown in every table, log line and URL path of the site (and names the lock
files of its sessions), so it follows the same safe set. A device id that pvsd writes into a
kernel command line (network boot, `pvsd.boot`) must be one word that neither the kernel nor
iPXE reads as anything but itself: `validate_device_id`.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RULE = "use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
MAX_DEVICE_ID = 128
"""What a LOGIN accepts (`pvsd.session`)."""
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_DEVICE_RULE = (
    "use 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit "
    "(a MAC address as 52-54-00-12-34-56, as iPXE's ${mac:hexhyp} writes it)"
)


class InvalidName(ValueError):
    """A name outside the safe set; the message says why and what is allowed."""


def validate_name(name: str, *, what: str = "vDisk") -> str:
    """Return ``name`` unchanged if it is a safe vDisk name, else raise `InvalidName`.

    ``what`` names the kind of name in the message ("vDisk", "server")."""
    if not name:
        raise InvalidName(f"{what} name is empty; {_RULE}")
    if len(name) > MAX_LENGTH:
        raise InvalidName(
            f"{what} name {name[:MAX_LENGTH]!r}... is {len(name)} characters; {_RULE}"
        )
    # fullmatch, not "$": "$" would let a trailing newline through.
    if _PATTERN.fullmatch(name) is None:
        raise InvalidName(f"{what} name {name!r} has a character that is not allowed; {_RULE}")
    if ".." in name:
        raise InvalidName(f"{what} name {name!r} contains '..'; {_RULE}, without '..'")
    return name


def validate_server_name(name: str) -> str:
    """Return ``name`` unchanged if it is a safe server name, else raise `InvalidName`."""
    return validate_name(name, what="server")


def is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidName:
        return False
    return True


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged if it is safe on a kernel command line and in a URL,
    else raise `InvalidName` (a LOGIN accepts more; a boot script never writes more)."""
    if _DEVICE_ID.fullmatch(device_id) is None:
        shown = device_id if len(device_id) <= MAX_DEVICE_ID else device_id[:MAX_DEVICE_ID] + "..."
        raise InvalidName(f"device id {shown!r} is not a device id; {_DEVICE_RULE}")
    return device_id
