"""What every part of the admin API shares: the refusal, the one check of a vDisk name in a
path, the one parser of request bodies, and the host names a server answers to."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from typing import Any

from aiohttp import web

from pvsd.names import InvalidName, validate_name

JSON = dict[str, Any]
RESOLVE_TIMEOUT = 2.0
RESOLVED_FOR = 60.0
"""How long a host name's addresses are taken as they were (DNS changes are rare and slow)."""


class ApiError(Exception):
    """A request we refuse; ``message`` tells the client what to do instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def vdisk_name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return validate_name(name)
    except InvalidName as error:
        raise ApiError(400, str(error)) from None


def parse_json(raw: bytes, *, example: str = "") -> object:
    """A request body as JSON (None for an empty body), or a 400 saying why not.

    Strict, so that nothing a handler accepts fails later where a 500 would be all the
    client learns: no NaN or Infinity (not JSON, and no file or peer takes them), no nesting
    deeper than Python can walk, and no lone UTF-16 surrogate. ``json`` accepts ``"\\ud800"``
    (and UTF-8-encoded surrogates) into a str that no file, log line or peer request can
    encode.
    """
    hint = f"; send {example}" if example else ""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, f"body is nested too deeply to be a request{hint}") from None
    except ValueError as error:
        raise ApiError(400, f"body is not JSON ({error}){hint}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(error.object[error.start])
        raise ApiError(
            400, f"body holds a lone UTF-16 surrogate (\\u{code:04x}), which is no character: "
            f"JSON strings must be valid Unicode{hint}",
        ) from None
    return value


def json_object(raw: bytes, *, empty: JSON | None = None, example: str = "") -> JSON:
    """A body that must be a JSON object; ``empty`` (if given) stands for an empty body."""
    value = parse_json(raw, example=example)
    if value is None and empty is not None:
        return dict(empty)
    if not isinstance(value, dict):
        hint = f", e.g. {example}" if example else ""
        raise ApiError(400, f"body must be a JSON object{hint}")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large a number")
    return value


class HostNames:
    """Host names resolved to addresses, for the check that a request was meant for this
    server (`pvsd.admin_auth.names_this_server`). Cached for a minute, bounded; asked only
    for requests that carry a valid MAC, so only a holder of the site key can make us look
    anything up. A name that does not resolve resolves to nothing (the request is refused)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def addresses(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, None, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError, UnicodeError):
            found: frozenset[str] = frozenset()
        else:
            found = frozenset(str(info[4][0]) for info in infos)
        if len(self._cache) >= self.capacity:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self.capacity:
                self._cache.clear()
        self._cache[host] = (now + RESOLVED_FOR, found)
        return found
