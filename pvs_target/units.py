"""Sizes on the command line: ``4096``, ``256K``, ``1M``, ``4GiB``, ``1T`` (binary units)."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """A positive byte count; argparse shows the message when the text is not one."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 4096, 256K, 1M or 4G")
    return int(match[1]) * _UNITS[match[2].lower()]
