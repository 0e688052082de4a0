"""Server addresses as the protocol carries them (REDIRECT, LOGIN_OK): ``HOST:PORT`` with the
port given. The parser is `pvs_protocol.addresses`, the one every tool uses; this module only
fixes the strict form for code that still imports it from here."""

from __future__ import annotations

from pvs_protocol.addresses import Address, AddressError, format_address
from pvs_protocol.addresses import parse_address as _parse_address


def parse_address(text: str) -> Address:
    """``HOST:PORT`` or ``[V6]:PORT``, the port given and not 0; AddressError (a ValueError)
    says what is wrong."""
    return _parse_address(text, default_port=None, any_port=False)


__all__ = ["Address", "AddressError", "format_address", "parse_address"]
