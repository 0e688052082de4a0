"""Sizes and rates as people type them, the same in every tool.

    512          bytes
    64K 64KiB    64 * 1024         (K, M, G, T, P and KiB, MiB, ...: powers of 1024)
    64KB         64 * 1000         (KB, MB, GB, TB, PB: powers of 1000, as disk vendors write)
    1.5G         1.5 * 1024**3     (a fraction is rounded down to whole bytes)

Units are case-insensitive and may follow a space (``10 GiB``); a trailing ``B`` alone means
bytes. A bare letter is binary because that is what ``dd``, ``truncate`` and qemu-img mean by
it, and what a cache or image size is made of; the ``KB`` family is decimal so that a size
copied from a data sheet means what the data sheet says. pvsctl, pvsd and pvs-target all parse
with this module, so ``10GB`` is one number everywhere (issue 13: it was 10**10 in pvsctl and
10 GiB in pvs-target).

Pure: no I/O. ``SizeError`` is also an ``argparse.ArgumentTypeError`` so that
``type=parse_size`` in a parser prints the message itself, and a ``ValueError`` so that schema
validators (pydantic) report it as a bad value.
"""

from __future__ import annotations

import argparse
import re
from decimal import ROUND_FLOOR, Decimal

_PREFIXES = "kmgtp"
UNITS: dict[str, int] = {"": 1, "b": 1} | {
    unit: factor
    for power, letter in enumerate(_PREFIXES, start=1)
    for unit, factor in (
        (letter, 1024**power),
        (f"{letter}ib", 1024**power),
        (f"{letter}b", 1000**power),
    )
}
"""Every unit accepted (lower case) and its factor."""

FORMS = (
    "a number of bytes, optionally with a unit: K, M, G, T (powers of 1024, also written "
    "KiB, MiB, GiB, TiB) or KB, MB, GB, TB (powers of 1000), e.g. 512, 64M, 10GiB, 10GB"
)
"""The accepted forms, for messages and help texts."""

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*")
_RATE_SUFFIXES = ("/s", "/sec")


class SizeError(ValueError, argparse.ArgumentTypeError):
    """A size or rate that cannot be understood; the message names it and the accepted forms."""


def parse_size(text: str) -> int:
    """Bytes from ``text`` (see the module's docstring); 0 is a size, negatives are not.

    Callers that need more (positive, a multiple of 512, a power of two) check the number and
    say why in their own words.
    """
    match = _SIZE.fullmatch(text)
    factor = UNITS.get(match[2].lower()) if match is not None else None
    if match is None or factor is None:
        raise SizeError(f"size {text!r} is not understood: write {FORMS}")
    value = Decimal(match[1]) * factor
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def parse_rate(text: str) -> int:
    """Bytes per second: a size, optionally followed by ``/s`` (``50M``, ``50MiB/s``); 0
    conventionally means no limit (the caller says so)."""
    stripped = text.strip()
    for suffix in _RATE_SUFFIXES:
        if stripped.lower().endswith(suffix) and len(stripped) > len(suffix):
            stripped = stripped[: -len(suffix)]
            break
    try:
        return parse_size(stripped)
    except SizeError:
        raise SizeError(
            f"rate {text!r} is not understood: write bytes per second as {FORMS}, "
            "optionally followed by /s"
        ) from None


def format_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``, ``4294967296`` -> ``4 GiB``, ``512`` -> ``512 B``: binary units,
    whole when exact, else one decimal; what it prints, `parse_size` reads back (to 0.1 unit)."""
    if size < 0:
        return "-" + format_size(-size)
    for power in range(len(_PREFIXES), 0, -1):
        factor = 1024**power
        if size >= factor:
            unit = f"{_PREFIXES[power - 1].upper()}iB"
            whole, rest = divmod(size, factor)
            return f"{whole} {unit}" if rest == 0 else f"{size / factor:.1f} {unit}"
    return f"{size} B"


def format_rate(rate: float) -> str:
    """``52428800`` -> ``50 MiB/s``; 0 or less -> ``unlimited``."""
    if rate <= 0:
        return "unlimited"
    return f"{format_size(int(rate))}/s"


__all__ = [
    "FORMS",
    "UNITS",
    "SizeError",
    "format_rate",
    "format_size",
    "parse_rate",
    "parse_size",
]
