"""Sizes on pvs-target's command line: `pvs_protocol.sizes`, so that ``10G`` (10 GiB) and
``10GB`` (10**10 bytes) mean here what they mean in pvsctl and pvsd, plus the target's rule
that a size option is more than nothing."""

from __future__ import annotations

from pvs_protocol.sizes import FORMS, SizeError, parse_size


def positive_size(text: str) -> int:
    """An argparse type: a bad or zero size is a usage error with its reason (exit code 2)."""
    size = parse_size(text)
    if size <= 0:
        raise SizeError(f"size {text!r} is 0 bytes: give more, e.g. 256K, 1M or 4G")
    return size


__all__ = ["FORMS", "parse_size", "positive_size"]
