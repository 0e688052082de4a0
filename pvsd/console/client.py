"""Talking to a pvsd admin API from pvsctl: where (``--admin``), with which key, and errors
turned into one line that names the address, what failed, and what to do."""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pvsd import admin_auth
from pvsd.config import DEFAULT_PORT, ConfigError, format_address, parse_address, read_key
from pvsd.console import UserError

ADMIN_ENV = "PVS_ADMIN"
KEY_ENV = "PVS_KEY_FILE"
DEFAULT_ADMIN_PORT = DEFAULT_PORT + 1
TIMEOUT = 15.0
"""Generous: a site-wide request waits up to a few seconds for each silent peer."""

_FIND_ADMIN = (
    "check that pvsd runs there with its admin API on (--admin HOST:PORT; by default the "
    "listen port + 1 once it has a site key)"
)


def options_parser(*, connection: bool = True) -> argparse.ArgumentParser:
    """The global options, accepted after a command too (``pvsctl servers --json``).

    Their defaults are suppressed here so that a value given before the command is kept.
    """
    parent = argparse.ArgumentParser(add_help=False)
    if connection:
        parent.add_argument(
            "--admin", metavar="HOST:PORT", default=argparse.SUPPRESS,
            help=f"admin API of any server of the site (or ${ADMIN_ENV})",
        )
        parent.add_argument(
            "--key-file", metavar="FILE", type=Path, default=argparse.SUPPRESS,
            help=f"the site key (or ${KEY_ENV})",
        )
    parent.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON"
    )
    return parent


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin", metavar="HOST:PORT",
        help=f"admin API of any server of the site (default: ${ADMIN_ENV})",
    )
    parser.add_argument(
        "--key-file", metavar="FILE", type=Path, help=f"the site key (default: ${KEY_ENV})"
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON")


def admin_requested(args: argparse.Namespace) -> bool:
    """Whether an admin API was named, by flag or by environment."""
    return bool(getattr(args, "admin", None) or os.environ.get(ADMIN_ENV))


def connect(args: argparse.Namespace, *, timeout: float = TIMEOUT) -> AdminClient:
    """An AdminClient from ``--admin``/``--key-file`` or their environment variables."""
    address = getattr(args, "admin", None) or os.environ.get(ADMIN_ENV)
    if not address:
        raise UserError(
            f"no admin API named: give --admin HOST:PORT of any server (or set {ADMIN_ENV})"
        )
    key_file = getattr(args, "key_file", None) or os.environ.get(KEY_ENV)
    if not key_file:
        raise UserError(
            f"no site key: give --key-file FILE (or set {KEY_ENV}), the key file the servers "
            "use"
        )
    try:
        key = read_key(Path(key_file))
    except ConfigError as error:
        raise UserError(str(error)) from None
    return AdminClient(normalize_address(address), key, timeout=timeout)


def normalize_address(text: str) -> str:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 6911) or ``http://HOST:PORT/``."""
    text = text.strip().removeprefix("http://").rstrip("/")
    try:
        host, port = parse_address(text, default_port=DEFAULT_ADMIN_PORT)
    except ConfigError as error:
        raise UserError(f"--admin {error}; write HOST:PORT") from None
    if text.startswith(":") or host == "0.0.0.0":
        host = "127.0.0.1"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UserError(f"--admin {text!r}: write HOST:PORT, or [IPv6]:PORT") from None
    if not port:
        raise UserError(f"--admin {text!r}: port 0 cannot be reached; write HOST:PORT")
    return format_address(host, port)


class AdminClient:
    """Signed JSON requests to one admin API."""

    def __init__(self, address: str, key: bytes, *, timeout: float = TIMEOUT) -> None:
        self.address = address
        self.key = key
        self.timeout = timeout

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, json.dumps(body).encode())

    def request(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        headers = {
            "Authorization": admin_auth.sign(self.key, method, path, body, _now_ms()),
            "Accept": "application/json",
        }
        if body:
            headers["Content-Type"] = "application/json"
        try:
            request = urllib.request.Request(
                f"http://{self.address}{path}", data=body or None, headers=headers, method=method
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return self._json(response.read(), response.status)
        except urllib.error.HTTPError as error:
            with error:
                answer = self._json(error.read(), error.code, failing=True)
            raise UserError(
                f"{self.address} refused {method} {path} (HTTP {error.code}): "
                f"{answer.get('error', 'no reason given')}"
            ) from None
        except urllib.error.URLError as error:
            raise UserError(self._unreachable(error.reason)) from None
        except TimeoutError:
            raise UserError(self._unreachable(TimeoutError())) from None
        except OSError as error:  # a connection reset half way through the answer
            raise UserError(self._unreachable(error)) from None
        except http.client.HTTPException:
            raise UserError(
                f"{self.address} does not speak HTTP (is it a stream port? the admin API is "
                "usually on the listen port + 1); give the admin address with --admin"
            ) from None
        except ValueError as error:  # an address urllib cannot make a URL of
            raise UserError(f"--admin {self.address}: {error}") from None

    def _json(self, raw: bytes, status: int, *, failing: bool = False) -> dict[str, Any]:
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if failing:
                return {"error": raw[:200].decode("utf-8", "replace").strip() or "no reason"}
            raise UserError(
                f"{self.address} answered HTTP {status} without a JSON object: is this a pvsd "
                f"admin API? {_FIND_ADMIN}"
            )
        return answer

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, TimeoutError):
            return (
                f"no answer from the admin API at {self.address} within {self.timeout:g} s; "
                f"{_FIND_ADMIN}, and that no firewall drops the port"
            )
        if isinstance(reason, ConnectionRefusedError):
            what = "connection refused"
        elif isinstance(reason, OSError):
            what = reason.strerror or str(reason)
        else:
            what = str(reason)
        return f"cannot reach the admin API at {self.address}: {what}; {_FIND_ADMIN}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
