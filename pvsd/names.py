"""Names: the one rule for vDisk names (from the store directory, the console and the network)
and for server names (from the configuration, the console and the admin API).

A vDisk name becomes a file name in the store (``NAME.img``), so anything that could climb out
of the directory, hide a file or confuse a shell is refused here rather than escaped later. A
server name is shown in every table, log line and URL path of the site (and names the lock
files of its sessions), so it follows the same safe set.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RULE = "use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


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
