"""vDisk names: the one rule for names from the store directory, the console and the network.

A name becomes a file name in the store (``NAME.img``), so anything that could climb out of the
directory, hide a file or confuse a shell is refused here rather than escaped later.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RULE = "use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class InvalidName(ValueError):
    """A vDisk name outside the safe set; the message says why and what is allowed."""


def validate_name(name: str) -> str:
    """Return ``name`` unchanged if it is a safe vDisk name, else raise `InvalidName`."""
    if not name:
        raise InvalidName(f"vDisk name is empty; {_RULE}")
    if len(name) > MAX_LENGTH:
        raise InvalidName(f"vDisk name {name[:MAX_LENGTH]!r}... is {len(name)} characters; {_RULE}")
    # fullmatch, not "$": "$" would let a trailing newline through.
    if _PATTERN.fullmatch(name) is None:
        raise InvalidName(f"vDisk name {name!r} has a character that is not allowed; {_RULE}")
    if ".." in name:
        raise InvalidName(f"vDisk name {name!r} contains '..'; {_RULE}, without '..'")
    return name


def is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidName:
        return False
    return True
