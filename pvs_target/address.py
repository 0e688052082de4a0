"""Server addresses as the user and the protocol write them: ``HOST:PORT``.

HOST is an IPv4 address, a host name, or an IPv6 address in brackets (``[::1]:6910``), the form
REDIRECT and LOGIN_OK carry. Parsing is strict so that a typo is reported where it was typed,
not as a connection failure later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_EXAMPLE = "expected HOST:PORT, e.g. 10.0.0.5:6910, pvs1.example:6910 or [fd00::5]:6910"


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    host: str
    """Without brackets, even for IPv6."""
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT``; raise ValueError naming what is wrong and what was expected."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty server address: {_EXAMPLE}")
    if "://" in text:
        raise ValueError(f"{text!r}: give the address without a scheme: {_EXAMPLE}")
    if text.startswith("["):
        host, separator, port = _split_bracketed(text)
    else:
        if text.count(":") > 1:
            raise ValueError(
                f"{text!r}: an IPv6 address must be written in brackets, as [ADDRESS]:PORT, "
                "e.g. [fd00::5]:6910"
            )
        host, separator, port = text.rpartition(":")
        if not separator:
            raise ValueError(f"{text!r} has no port: {_EXAMPLE}")
        _check_host(text, host)
    return Address(host, _parse_port(text, port))


def _split_bracketed(text: str) -> tuple[str, str, str]:
    close = text.find("]")
    if close < 0:
        raise ValueError(f"{text!r}: missing ']' after the IPv6 address: {_EXAMPLE}")
    host, rest = text[1:close], text[close + 1 :]
    if not rest.startswith(":"):
        raise ValueError(f"{text!r} has no port after ']': {_EXAMPLE}")
    if not _is_ipv6(host):
        raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address")
    return host, ":", rest[1:]


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _check_host(text: str, host: str) -> None:
    if not host:
        raise ValueError(f"{text!r} has no host: {_EXAMPLE}")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not a valid IPv4 address") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(
            f"{text!r}: {host!r} is not a valid host name "
            "(letters, digits and '-', dot-separated labels of at most 63 characters)"
        )


def _parse_port(text: str, port: str) -> int:
    if not port.isdigit() or not port.isascii():
        raise ValueError(f"{text!r}: port {port!r} is not a number: {_EXAMPLE}")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{text!r}: port {number} is outside 1-65535")
    return number


__all__ = ["Address", "format_address", "parse_address"]
