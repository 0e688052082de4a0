from __future__ import annotations

import re

import pytest

from pvs_target.address import Address, format_address, parse_address


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.5:6910", "10.0.0.5", 6910),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("pvs1:6910", "pvs1", 6910),
        ("pvs1.example.org:65535", "pvs1.example.org", 65535),
        ("pvs1.example.org.:80", "pvs1.example.org.", 80),
        ("my-server_2:80", "my-server_2", 80),
        ("[::1]:6910", "::1", 6910),
        ("[fd00::5]:6910", "fd00::5", 6910),
        ("[fe80::1%eth0]:6910", "fe80::1%eth0", 6910),
        ("  10.0.0.5:6910\n", "10.0.0.5", 6910),
    ],
)
def test_parse(text: str, host: str, port: int) -> None:
    assert parse_address(text) == Address(host, port)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("pvs1", "no port"),
        ("10.0.0.5", "no port"),
        (":6910", "no host"),
        ("pvs1:", "not a number"),
        ("pvs1:http", "not a number"),
        ("pvs1:-1", "not a number"),
        ("pvs1:0", "outside 1-65535"),
        ("pvs1:65536", "outside 1-65535"),
        ("pvs1:６９", "not a number"),
        ("::1:6910", "in brackets"),
        ("fd00::5", "in brackets"),
        ("[::1]", "no port after ']'"),
        ("[::1]6910", "no port after ']'"),
        ("[::1:6910", "missing ']'"),
        ("[10.0.0.5]:6910", "not an IPv6 address"),
        ("[pvs1]:6910", "not an IPv6 address"),
        ("10.0.0.256:6910", "not a valid IPv4 address"),
        ("10.0.0:6910", "not a valid IPv4 address"),
        ("pvs 1:6910", "not a valid host name"),
        ("-pvs:6910", "not a valid host name"),
        ("pvs..example:6910", "not a valid host name"),
        ("a" * 64 + ".example:6910", "not a valid host name"),
        ("http://pvs1:6910", "without a scheme"),
        ("pvs/1:6910", "not a valid host name"),
    ],
)
def test_parse_rejects_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        parse_address(text)


def test_every_error_shows_the_expected_form() -> None:
    for text in ("", "pvs1", "pvs1:x"):
        with pytest.raises(ValueError, match=r"expected HOST:PORT"):
            parse_address(text)


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("10.0.0.5", 6910, "10.0.0.5:6910"),
        ("pvs1", 80, "pvs1:80"),
        ("::1", 6910, "[::1]:6910"),
        ("fe80::1%eth0", 1, "[fe80::1%eth0]:1"),
    ],
)
def test_format(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text
    assert str(Address(host, port)) == text


@pytest.mark.parametrize("text", ["10.0.0.5:6910", "pvs1:1", "[::1]:6910", "[fd00::5]:65535"])
def test_round_trip(text: str) -> None:
    assert str(parse_address(text)) == text
