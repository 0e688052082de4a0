"""The one size parser of every tool: units, errors, formatting, argparse."""

from __future__ import annotations

import argparse
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvs_protocol.sizes import (
    SizeError,
    format_rate,
    format_size,
    parse_rate,
    parse_size,
)

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("512 b", 512),
        ("4K", 4 * KIB),
        ("4k", 4 * KIB),
        ("4KiB", 4 * KIB),
        ("4kib", 4 * KIB),
        ("4KB", 4000),
        ("4kb", 4000),
        ("64M", 64 * MIB),
        ("64MiB", 64 * MIB),
        ("64MB", 64_000_000),
        ("10G", 10 * GIB),
        ("10GiB", 10 * GIB),
        ("10 GiB", 10 * GIB),
        ("10GB", 10_000_000_000),
        ("2T", 2 * TIB),
        ("2TB", 2 * 10**12),
        ("1P", 1 << 50),
        ("1PB", 10**15),
        ("  1M\n", MIB),
        ("1.5K", 1536),
        ("1.5G", 3 * GIB // 2),
        (".5M", MIB // 2),
        ("1.", 1),
        ("0.1K", 102),  # rounded down to whole bytes
    ],
)
def test_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_ten_gb_is_one_number_everywhere() -> None:
    """The bug of issue 13: 10GB was 10**10 bytes in pvsctl and 10 GiB in pvs-target."""
    assert parse_size("10GB") == 10 * 1000**3
    assert parse_size("10G") == parse_size("10GiB") == 10 * 1024**3


@pytest.mark.parametrize(
    "text", ["", " ", "M", "-1", "-1M", "1e9", "1 2", "1MM", "1Mi", "1X", "1 GiBs", "1,5G",
             "0x10", "1_000", "١٢", "1.2.3", "inf", "nan"],
)
def test_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(SizeError, match=re.escape(repr(text))) as caught:
        parse_size(text)
    assert "KiB" in str(caught.value) and "10GB" in str(caught.value)


def test_error_is_a_value_error_and_an_argparse_type_error() -> None:
    """argparse prints an ArgumentTypeError's own message; pydantic reports a ValueError."""
    assert issubclass(SizeError, ValueError)
    assert issubclass(SizeError, argparse.ArgumentTypeError)
    parser = argparse.ArgumentParser(prog="tool", exit_on_error=False)
    parser.add_argument("--size", type=parse_size)
    assert parser.parse_args(["--size", "1G"]).size == GIB
    with pytest.raises(argparse.ArgumentError, match=r"size '1Q' is not understood"):
        parser.parse_args(["--size", "1Q"])


@pytest.mark.parametrize(
    ("text", "rate"),
    [("0", 0), ("50M", 50 * MIB), ("50MiB/s", 50 * MIB), ("50 MB/s", 50_000_000),
     ("800K", 800 * KIB), ("1.5k", 1536), ("2MB/sec", 2_000_000), (" 1G/s ", GIB)],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "/s", "fast", "50M/h", "-1M/s", "50M/s/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(SizeError, match=r"rate .* is not understood.*per second"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
     (4 * GIB, "4 GiB"), (10 * GIB + GIB // 2, "10.5 GiB"), (2 * TIB, "2 TiB"),
     (10_000_000_000, "9.3 GiB"), (1 << 50, "1 PiB"), (3 << 60, "3072 PiB"), (-MIB, "-1 MiB")],
)
def test_format(size: int, text: str) -> None:
    assert format_size(size) == text


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(-1) == "unlimited"
    assert format_rate(50 * MIB) == "50 MiB/s"
    assert format_rate(1.5 * KIB) == "1.5 KiB/s"


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_reads_back_within_a_tenth_of_its_unit(size: int) -> None:
    text = format_size(size)
    parsed = parse_size(text.replace(" ", ""))
    unit = 1024 ** (("B", "KiB", "MiB", "GiB", "TiB", "PiB").index(text.split()[1]))
    assert abs(parsed - size) <= unit // 20 + 1


@given(st.integers(min_value=0, max_value=1 << 40), st.sampled_from(["", "K", "M", "G"]))
def test_whole_numbers_with_binary_units(number: int, unit: str) -> None:
    factor = {"": 1, "K": KIB, "M": MIB, "G": GIB}[unit]
    assert parse_size(f"{number}{unit}") == number * factor
    assert parse_size(f"{number}{unit.lower()}iB" if unit else str(number)) == number * factor
