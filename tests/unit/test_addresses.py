"""The one address parser of every tool: HOST:PORT, [v6]:PORT, HOST, :PORT, unix:PATH and NBD
URIs, with a reason for every refusal."""

from __future__ import annotations

import argparse
import re

import pytest

from pvs_protocol.addresses import (
    NBD_PORT,
    STREAM_PORT,
    Address,
    AddressError,
    TcpEndpoint,
    UnixEndpoint,
    format_address,
    parse_address,
    parse_endpoint,
)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.5:6910", "10.0.0.5", 6910),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("pvs1:6910", "pvs1", 6910),
        ("pvs1.example.org:65535", "pvs1.example.org", 65535),
        ("pvs1.example.org.:80", "pvs1.example.org.", 80),
        ("my-server_2:80", "my-server_2", 80),
        ("localhost:7000", "localhost", 7000),
        ("[::1]:6910", "::1", 6910),
        ("[fd00::5]:6910", "fd00::5", 6910),
        ("[fe80::1%eth0]:6910", "fe80::1%eth0", 6910),
        ("  10.0.0.5:6910\n", "10.0.0.5", 6910),
        ("pvs1", "pvs1", STREAM_PORT),
        ("10.0.0.5", "10.0.0.5", STREAM_PORT),
        ("[::1]", "::1", STREAM_PORT),
        (":7000", "0.0.0.0", 7000),
        (":0", "0.0.0.0", 0),
    ],
)
def test_parse(text: str, host: str, port: int) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert address == (host, port)  # a plain tuple too: `host, port = parse_address(...)`
    assert (address.host, address.port) == (host, port)


def test_default_port() -> None:
    assert parse_address("pvs1", default_port=6911) == ("pvs1", 6911)
    assert parse_address("[::1]", default_port=NBD_PORT) == ("::1", NBD_PORT)
    assert parse_address("pvs1:80", default_port=6911) == ("pvs1", 80)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("pvs1:", "has no port"),
        (":", "has no port"),
        ("pvs1:http", "not a number"),
        ("pvs1:-1", "not a number"),
        ("pvs1:65536", "outside 0-65535"),
        ("pvs1:６９", "not a number"),
        ("pvs1:1:2", "in brackets"),
        ("::1:6910", "in brackets"),
        ("fd00::5", "in brackets"),
        ("[::1]6910", "expected ':PORT' after ']'"),
        ("[::1]:", "expected ':PORT' after ']'"),
        ("[::1:6910", "missing ']'"),
        ("[10.0.0.5]:6910", "not an IPv6 address"),
        ("[pvs1]:6910", "not an IPv6 address"),
        ("10.0.0.256:6910", "not a valid IPv4 address"),
        ("10.0.0:6910", "not a valid IPv4 address"),
        ("pvs 1:6910", "not a valid host name"),
        ("-pvs:6910", "not a valid host name"),
        ("pvs..example:6910", "not a valid host name"),
        ("a" * 64 + ".example:6910", "not a valid host name"),
        ("pvs/1:6910", "not a valid host name"),
        ("http://pvs1:6910", "without a scheme"),
    ],
)
def test_rejects_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=re.escape(complaint)) as caught:
        parse_address(text)
    if text.strip():
        assert repr(text) in str(caught.value), "the message names what was typed"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("pvs1", "has no port"), ("[::1]", "has no port"), ("pvs1:0", "outside 1-65535")],
)
def test_strict_forms(text: str, complaint: str) -> None:
    """Where a port must be given (no default) and where port 0 means nothing (connecting)."""
    with pytest.raises(AddressError, match=re.escape(complaint)):
        parse_address(text, default_port=None, any_port=False)


def test_every_error_shows_the_expected_form() -> None:
    for text in ("", "pvs1:", "pvs1:x"):
        with pytest.raises(AddressError, match=r"expected HOST:PORT or HOST \(port 6910\)"):
            parse_address(text)
    with pytest.raises(AddressError, match=r"expected HOST:PORT, e\.g\. 10\.0\.0\.5:6910"):
        parse_address("pvs1", default_port=None)


def test_error_is_a_value_error_and_an_argparse_type_error() -> None:
    assert issubclass(AddressError, ValueError)
    parser = argparse.ArgumentParser(prog="tool", exit_on_error=False)
    parser.add_argument("--server", type=parse_address)
    assert parser.parse_args(["--server", "pvs1"]).server == ("pvs1", STREAM_PORT)
    with pytest.raises(argparse.ArgumentError, match=r"'pvs1:x': port 'x' is not a number"):
        parser.parse_args(["--server", "pvs1:x"])


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


@pytest.mark.parametrize(
    "text", ["10.0.0.5:6910", "pvs1:1", "[::1]:6910", "[fd00::5]:65535", "0.0.0.0:0"]
)
def test_round_trip(text: str) -> None:
    assert str(parse_address(text)) == text


# -- endpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:10809", TcpEndpoint("127.0.0.1", 10809)),
        ("127.0.0.1:0", TcpEndpoint("127.0.0.1", 0)),
        ("[::1]:7000", TcpEndpoint("::1", 7000)),
        ("localhost", TcpEndpoint("localhost", NBD_PORT)),
        ("unix:/run/pvs/disk.sock", UnixEndpoint("/run/pvs/disk.sock")),
        ("unix:disk.sock", UnixEndpoint("disk.sock")),
        ("nbd://127.0.0.1", TcpEndpoint("127.0.0.1", NBD_PORT)),
        ("nbd://127.0.0.1/", TcpEndpoint("127.0.0.1", NBD_PORT)),
        ("nbd://127.0.0.1:7000/win10", TcpEndpoint("127.0.0.1", 7000, "win10")),
        ("NBD://[::1]:7000/a%20b", TcpEndpoint("::1", 7000, "a b")),
        ("nbd+unix:///?socket=/run/x.sock", UnixEndpoint("/run/x.sock")),
        ("nbd+unix:///win10?socket=/run/x.sock", UnixEndpoint("/run/x.sock", "win10")),
        ("nbd+unix:///win10?socket=/run/a%20b.sock", UnixEndpoint("/run/a b.sock", "win10")),
    ],
)
def test_parse_nbd_endpoint(text: str, endpoint: TcpEndpoint | UnixEndpoint) -> None:
    assert parse_endpoint(text, default_port=NBD_PORT, nbd=True) == endpoint


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("unix:", "needs a socket path"),
        ("nbds://127.0.0.1/x", "TLS is not supported"),
        ("nbds+unix:///x?socket=/s", "TLS is not supported"),
        ("nbd+vsock://1/x", "'nbd+vsock' is not understood"),
        ("http://127.0.0.1/x", "'http' is not understood"),
        ("nbd:///x", "needs a host"),
        ("nbd://user@127.0.0.1/x", "user names"),
        ("nbd://127.0.0.1/x#y", "fragment"),
        ("nbd://127.0.0.1/x?tls=require", "tls are not supported"),
        ("nbd://127.0.0.1:99999/x", "outside 0-65535"),
        ("nbd://fd00::5/x", "in brackets"),
        ("nbd+unix:///x", "give the socket path once"),
        ("nbd+unix:///x?socket=", "give the socket path once"),
        ("nbd+unix:///x?socket=/a&socket=/b", "give the socket path once"),
        ("nbd+unix://host/x?socket=/a", "takes no host"),
        ("nbd+unix:///x?socket=/a&tls=on", "tls are not supported"),
        ("pvs 1:7000", "nbd://HOST[:PORT]/[EXPORT]"),
    ],
)
def test_parse_nbd_endpoint_rejects(text: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=re.escape(complaint)):
        parse_endpoint(text, default_port=NBD_PORT, nbd=True)


def test_uris_only_where_nbd_is_meant() -> None:
    with pytest.raises(AddressError, match=r"'nbd' is not understood: expected HOST:PORT or unix"):
        parse_endpoint("nbd://127.0.0.1/x")
    assert parse_endpoint("unix:/s") == UnixEndpoint("/s")


@pytest.mark.parametrize(
    ("endpoint", "export", "uri"),
    [
        (TcpEndpoint("127.0.0.1", 10809), "win10", "nbd://127.0.0.1:10809/win10"),
        (TcpEndpoint("::1", 7000), "a b", "nbd://[::1]:7000/a%20b"),
        (UnixEndpoint("/run/x.sock"), "win10", "nbd+unix:///win10?socket=/run/x.sock"),
        (UnixEndpoint("/run/x.sock", "d"), None, "nbd+unix:///d?socket=/run/x.sock"),
    ],
)
def test_nbd_uri_round_trip(
    endpoint: TcpEndpoint | UnixEndpoint, export: str | None, uri: str
) -> None:
    assert endpoint.nbd_uri(export) == uri
    parsed = parse_endpoint(uri, default_port=NBD_PORT, nbd=True)
    assert str(parsed) == str(endpoint)
    assert parsed.export == (endpoint.export if export is None else export)


def test_endpoint_text_is_what_the_nbd_server_listens_on() -> None:
    assert str(TcpEndpoint("::1", 0)) == "[::1]:0"
    assert str(UnixEndpoint("/run/x.sock", "ignored")) == "unix:/run/x.sock"
