"""Talking to a pvsd admin API from pvsctl: where (``--admin``), with which key, over TLS
checked against which CA (``--ca``), and errors turned into one line that names the address,
what failed, and what to do."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pvs_protocol.addresses import ANY_HOST, AddressError, format_address, parse_address
from pvsd import admin_auth
from pvsd.config import DEFAULT_PORT, ConfigError, read_key
from pvsd.console import UserError
from pvsd.tls import TlsError, client_context

ADMIN_ENV = "PVS_ADMIN"
KEY_ENV = "PVS_KEY_FILE"
CA_ENV = "PVS_CA"
CERT_ENV = "PVS_CERT"
CERT_KEY_ENV = "PVS_CERT_KEY"
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
        _add_tls_options(parent, default=argparse.SUPPRESS)
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
    _add_tls_options(parser, default=None)
    parser.add_argument("--json", action="store_true", help="print raw JSON")


def _add_tls_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "--ca", metavar="FILE", type=Path, default=default,
        help=f"talk TLS (https) and accept only a server certificate of this CA: the site CA, "
        f"ca.pem of 'pvsctl site certs' (or ${CA_ENV})",
    )
    parser.add_argument(
        "--cert", metavar="FILE", type=Path, default=default,
        help=f"over TLS, show this client certificate (PEM), named in the servers' audit lines "
        f"(or ${CERT_ENV})",
    )
    parser.add_argument(
        "--cert-key", metavar="FILE", type=Path, default=default,
        help=f"the key of --cert, if not in the same file (or ${CERT_KEY_ENV})",
    )


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
    ca = _path(args, "ca", CA_ENV)
    cert = _path(args, "cert", CERT_ENV)
    cert_key = _path(args, "cert_key", CERT_KEY_ENV)
    https = address.strip().lower().startswith("https://")
    if address.strip().lower().startswith("http://") and ca is not None:
        raise UserError(f"--admin {address} says http://, --ca says TLS: drop one of them")
    context = None
    if https or ca is not None or cert is not None:
        try:
            context = client_context(ca, cert, cert_key)
        except TlsError as error:
            raise UserError(str(error)) from None
    elif cert_key is not None:
        raise UserError("--cert-key goes with --cert (and TLS: --ca FILE)")
    return AdminClient(
        normalize_address(address), key, timeout=timeout, context=context,
        ca=str(ca) if ca is not None else None,
    )


def _path(args: argparse.Namespace, name: str, variable: str) -> Path | None:
    value = getattr(args, name, None) or os.environ.get(variable)
    return Path(value) if value else None


def normalize_address(text: str) -> str:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 6911) or ``http(s)://HOST:PORT/``."""
    text = text.strip()
    for scheme in ("http://", "https://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    try:  # the one parser of every tool; port 0 means nothing to connect to
        host, port = parse_address(text, default_port=DEFAULT_ADMIN_PORT, any_port=False)
    except AddressError as error:
        raise UserError(f"--admin {error}") from None
    if host == ANY_HOST:  # ":6911", or a wildcard copied from a listen setting: this machine
        host = "127.0.0.1"
    return format_address(host, port)


class AdminClient:
    """Signed JSON requests to one admin API: plain HTTP, or TLS with ``context`` (which
    checks the server's certificate against ``ca``, None: the system's CAs)."""

    def __init__(
        self,
        address: str,
        key: bytes,
        *,
        timeout: float = TIMEOUT,
        context: ssl.SSLContext | None = None,
        ca: str | None = None,
    ) -> None:
        self.address = address
        self.key = key
        self.timeout = timeout
        self.context = context
        self.ca = ca

    @property
    def scheme(self) -> str:
        return "https" if self.context is not None else "http"

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, json.dumps(body).encode())

    def request(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        try:
            target = admin_auth.target(
                self.address, default_port=443 if self.context is not None else 80
            )
        except ValueError as error:
            raise UserError(f"--admin {error}; write HOST:PORT") from None
        headers = {
            # Signed for the server we address: no other server of the site accepts it.
            "Authorization": admin_auth.sign(self.key, method, path, body, _now_ms(),
                                             target=target),
            "Accept": "application/json",
        }
        if body:
            headers["Content-Type"] = "application/json"
        try:
            request = urllib.request.Request(
                f"{self.scheme}://{self.address}{path}", data=body or None, headers=headers,
                method=method,
            )
            with urllib.request.urlopen(
                request, timeout=self.timeout, context=self.context
            ) as response:
                return self._json(response.read(), response.status)
        except urllib.error.HTTPError as error:
            with error:
                answer = self._json(error.read(), error.code, failing=True)
            raise UserError(
                f"{self.address} refused {method} {path} (HTTP {error.code}): "
                f"{answer.get('error', 'no reason given')}"
            ) from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, ssl.SSLError):
                raise UserError(self._tls_failed(error.reason)) from None
            raise UserError(self._unreachable(error.reason)) from None
        except ssl.SSLError as error:
            raise UserError(self._tls_failed(error)) from None
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

    def _tls_failed(self, error: ssl.SSLError) -> str:
        if isinstance(error, ssl.SSLCertVerificationError):
            vouching = (
                f"the CA in {self.ca} does not vouch for" if self.ca
                else "no CA of this system vouches for"
            )
            return (
                f"the admin API at {self.address} showed a certificate that {vouching} "
                f"({error.verify_message}); give the site CA with --ca FILE (ca.pem of "
                "pvsctl site certs), and an --admin address its certificate names"
            )
        return (
            f"no TLS with the admin API at {self.address} ({error.reason or error}): if it "
            "serves plain HTTP, leave out --ca and https://"
        )

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
        tls = ""
        if self.context is None and isinstance(reason, ConnectionError | http.client.HTTPException):
            tls = f"; if its admin API uses TLS, give --ca FILE (or ${CA_ENV})"
        return f"cannot reach the admin API at {self.address}: {what}; {_FIND_ADMIN}{tls}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
