"""Addresses as people type them and the protocol carries them, the same in every tool.

    10.0.0.5:6910   pvs1.example:6910   [fd00::5]:6910    HOST:PORT
    pvs1   [fd00::5]                                      HOST alone: the default port
    :6910                                                 every interface (0.0.0.0)

and, where an endpoint (something to listen on or connect to) is meant, also

    unix:/run/pvs/disk.sock                               a unix socket
    nbd://10.0.0.5:10809/win10                            an NBD URI (where NBD is meant)
    nbd+unix:///win10?socket=/run/pvs/disk.sock

An IPv6 host must be in brackets: ``fd00::5:6910`` could be a host and a port or a whole
address. Host names are checked here (letters, digits, ``-`` and ``_`` in dot-separated labels)
so that a typo is reported where it was typed, not as a connection failure later.

Pure: no I/O, no name resolution. ``AddressError`` is also an ``argparse.ArgumentTypeError``
so that ``type=...`` in a parser prints the message itself, and a ``ValueError`` so that schema
validators (pydantic) report it as a bad value.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import re
import urllib.parse
from typing import NamedTuple

STREAM_PORT = 6910
"""pvsd's stream port: targets log in here, servers talk to each other here."""
NBD_PORT = 10809
"""The NBD port registered with IANA: what NBD clients try when a URI gives none."""
ANY_HOST = "0.0.0.0"
"""What ``:PORT`` means: every interface to listen on (and this machine to connect to)."""

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_NBD_SCHEMES = ("nbd", "nbd+unix")


class AddressError(ValueError, argparse.ArgumentTypeError):
    """An address that cannot be understood; the message names it and what was expected."""


class Address(NamedTuple):
    """A host (without brackets, even for IPv6) and a port: a plain tuple to unpack, printed as
    ``HOST:PORT``."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(
    text: str, *, default_port: int | None = STREAM_PORT, any_port: bool = True
) -> Address:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` (see the module's docstring).

    ``default_port`` None: the port must be given. ``any_port`` False: port 0 (any free port,
    which only means something to listen on) is refused.
    """
    stripped = text.strip()
    expected = _expected(default_port)
    if not stripped:
        raise AddressError(f"empty address: {expected}")
    if "://" in stripped:
        raise AddressError(f"address {text!r}: give it without a scheme: {expected}")
    port_text: str | None
    if stripped.startswith("["):
        host, port_text = _split_bracketed(text, stripped, expected)
    elif stripped.count(":") > 1:
        raise AddressError(
            f"address {text!r}: write an IPv6 address in brackets, as [ADDRESS]:PORT "
            "(e.g. [fd00::5]:6910)"
        )
    else:
        host, separator, port = stripped.partition(":")
        if separator and not port:
            raise AddressError(f"address {text!r} ends in ':' but has no port: {expected}")
        port_text = port if separator else None
        if host:
            _check_host(text, host)
        else:  # ":PORT"
            host = ANY_HOST
    if port_text is None:
        if default_port is None:
            raise AddressError(f"address {text!r} has no port: {expected}")
        return Address(host, default_port)
    return Address(host, _parse_port(text, port_text, expected, any_port=any_port))


def _expected(default_port: int | None) -> str:
    port = STREAM_PORT if default_port is None else default_port
    forms = "HOST:PORT" if default_port is None else f"HOST:PORT or HOST (port {default_port})"
    return f"expected {forms}, e.g. 10.0.0.5:{port}, pvs1.example:{port} or [fd00::5]:{port}"


def _split_bracketed(text: str, stripped: str, expected: str) -> tuple[str, str | None]:
    close = stripped.find("]")
    if close < 0:
        raise AddressError(f"address {text!r}: missing ']' after the IPv6 address: {expected}")
    host, rest = stripped[1:close], stripped[close + 1 :]
    if not _is_ipv6(host):
        raise AddressError(f"address {text!r}: {host!r} in brackets is not an IPv6 address")
    if not rest:
        return host, None
    if not rest.startswith(":") or len(rest) == 1:
        raise AddressError(f"address {text!r}: expected ':PORT' after ']': {expected}")
    return host, rest[1:]


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _check_host(text: str, host: str) -> None:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise AddressError(f"address {text!r}: {host!r} is not a valid IPv4 address") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise AddressError(
            f"address {text!r}: {host!r} is not a valid host name "
            "(letters, digits and '-', dot-separated labels of at most 63 characters)"
        )


def _parse_port(text: str, port: str, expected: str, *, any_port: bool) -> int:
    if not port.isascii() or not port.isdigit():
        raise AddressError(f"address {text!r}: port {port!r} is not a number: {expected}")
    number = int(port)
    if number > 65535 or (number == 0 and not any_port):
        low = 0 if any_port else 1
        raise AddressError(f"address {text!r}: port {number} is outside {low}-65535")
    return number


# -- endpoints --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TcpEndpoint:
    host: str
    port: int
    export: str = ""
    """The export name an NBD URI gave (``nbd://HOST/NAME``); empty if none."""

    def __str__(self) -> str:
        return format_address(self.host, self.port)

    def nbd_uri(self, export: str | None = None) -> str:
        """The URI an NBD client (qemu, nbdcopy, nbdfuse) is given for this endpoint."""
        name = self.export if export is None else export
        return f"nbd://{format_address(self.host, self.port)}/{urllib.parse.quote(name, safe='')}"


@dataclasses.dataclass(frozen=True, slots=True)
class UnixEndpoint:
    path: str
    export: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}"

    def nbd_uri(self, export: str | None = None) -> str:
        name = self.export if export is None else export
        socket = urllib.parse.quote(self.path, safe="/")
        return f"nbd+unix:///{urllib.parse.quote(name, safe='')}?socket={socket}"


Endpoint = TcpEndpoint | UnixEndpoint


def parse_endpoint(
    text: str, *, default_port: int | None = None, any_port: bool = True, nbd: bool = False
) -> Endpoint:
    """``HOST:PORT`` (as `parse_address`) or ``unix:PATH``; with ``nbd``, also the NBD URIs
    ``nbd://HOST[:PORT]/[EXPORT]`` and ``nbd+unix:///[EXPORT]?socket=PATH`` (NBD's URI
    specification; the port defaults to 10809 there)."""
    stripped = text.strip()
    forms = "HOST:PORT or unix:PATH" + (
        ", or an NBD URI: nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH"
        if nbd else ""
    )
    if stripped.startswith("unix:") and not stripped.startswith("unix://"):
        path = stripped[len("unix:") :]
        if not path:
            raise AddressError(f"address {text!r}: unix: needs a socket path, e.g. "
                               "unix:/run/pvs-target/disk.sock")
        return UnixEndpoint(path)
    if "://" in stripped:
        scheme = stripped.partition("://")[0].lower()
        if not nbd or scheme not in _NBD_SCHEMES:
            hint = " (NBD over TLS is not supported)" if nbd and scheme.startswith("nbds") else ""
            raise AddressError(f"address {text!r}: scheme {scheme!r} is not understood{hint}: "
                               f"expected {forms}")
        return _parse_nbd_uri(text, stripped)
    try:
        host, port = parse_address(stripped, default_port=default_port, any_port=any_port)
    except AddressError as error:
        raise AddressError(f"{error} (or {forms})") from None
    return TcpEndpoint(host, port)


def _parse_nbd_uri(text: str, stripped: str) -> Endpoint:
    try:
        parts = urllib.parse.urlsplit(stripped)
    except ValueError as error:
        raise AddressError(f"NBD URI {text!r}: {error}") from None
    if parts.fragment:
        raise AddressError(f"NBD URI {text!r}: a '#' fragment means nothing here")
    if "@" in parts.netloc:
        raise AddressError(f"NBD URI {text!r}: user names are not supported")
    export = urllib.parse.unquote(parts.path.removeprefix("/"))
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme.lower() == "nbd+unix":
        if parts.netloc:
            raise AddressError(f"NBD URI {text!r}: nbd+unix:// takes no host: write "
                               "nbd+unix:///EXPORT?socket=PATH")
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise AddressError(f"NBD URI {text!r}: give the socket path once, as "
                               "nbd+unix:///EXPORT?socket=PATH")
        _no_other_query(text, query)
        return UnixEndpoint(sockets[0], export)
    _no_other_query(text, query)
    if not parts.netloc:
        raise AddressError(f"NBD URI {text!r}: nbd:// needs a host: nbd://HOST[:PORT]/[EXPORT]")
    host, port = parse_address(parts.netloc, default_port=NBD_PORT)
    return TcpEndpoint(host, port, export)


def _no_other_query(text: str, query: dict[str, list[str]]) -> None:
    if query:
        names = ", ".join(sorted(query))
        raise AddressError(f"NBD URI {text!r}: query parameter(s) {names} are not supported")


__all__ = [
    "ANY_HOST",
    "NBD_PORT",
    "STREAM_PORT",
    "Address",
    "AddressError",
    "Endpoint",
    "TcpEndpoint",
    "UnixEndpoint",
    "format_address",
    "parse_address",
    "parse_endpoint",
]
