"""TLS for the admin API: the contexts (stdlib ssl) and the site's certificates.

A site with TLS has one certificate authority (the site CA) and one certificate per server.
Each server serves its admin API with its certificate (``admin_tls_cert``, ``admin_tls_key``)
and checks, against the site CA (``admin_tls_ca``), the peers it calls: a peer must show a
certificate of the site CA made out to its server *name* (as a DNS name), whatever address it
is reached at, since the name is what the site knows a server by. Servers show their
certificates to each other as client certificates too, so that a server's audit lines name
the peer that forwarded a change; a client certificate is optional (pvsctl may show one,
``--cert``), but one that is shown must come from the site CA.

`make_site_certificates` makes the site CA and the certificates (``pvsctl site certs``);
`cryptography` is imported only there, so pvsd and pvsctl start without it.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import secrets
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from yarl import URL

from pvsd import admin_auth

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
CA_DAYS = 3650
CERTIFICATE_DAYS = 825
"""The longest validity clients accept for a server certificate without complaint."""
CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
}


class TlsError(Exception):
    """A TLS file or setting that cannot be used; the message names it and what to do."""


class _Transport(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


# -- settings ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AdminTls:
    """This server's certificate, its key, and the site CA."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_config(cls, config: object) -> AdminTls | None:
        """From ``admin_tls_cert``, ``admin_tls_key`` and ``admin_tls_ca`` (all or none)."""
        names = ("admin_tls_cert", "admin_tls_key", "admin_tls_ca")
        values = [getattr(config, name, None) for name in names]
        if not any(values):
            return None
        missing = [name for name, value in zip(names, values, strict=True) if not value]
        if missing:
            raise TlsError(
                f"{', '.join(missing)} missing: admin_tls_cert, admin_tls_key and admin_tls_ca "
                "go together (make them with pvsctl site certs)"
            )
        cert, key, ca = (Path(str(value)) for value in values)
        return cls(cert, key, ca)

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key, self.ca)

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca, self.cert, self.key)


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """Serve with ``cert``; accept client certificates of ``ca`` (optional ones)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Check servers against ``ca`` (None: the system's CAs), by host name; show ``cert``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = MINIMUM_VERSION
    if ca is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, ca)
    if cert is not None:
        _load_chain(context, cert, key or cert)
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as error:
        raise TlsError(
            f"certificate or key file {error.filename or cert} does not exist; check the path "
            "(pvsctl site certs makes them)"
        ) from None
    except PermissionError as error:
        raise TlsError(
            f"cannot read {error.filename or cert}: permission denied; let the user running "
            "this read it (keep the key mode 600)"
        ) from None
    except ssl.SSLError as error:
        what = (
            f"key {key} does not belong to certificate {cert}" if "MISMATCH" in str(error)
            else f"certificate {cert} or key {key} is not PEM"
        )
        raise TlsError(
            f"{what} ({error.reason or error}); give a certificate and the key made with it "
            "(PEM, as pvsctl site certs writes them)"
        ) from None
    except OSError as error:
        raise TlsError(f"cannot read {cert} or {key}: {error.strerror or error}") from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise TlsError(
            f"CA file {ca} does not exist; give the site CA (ca.pem of pvsctl site certs)"
        ) from None
    except (ssl.SSLError, ValueError) as error:
        raise TlsError(f"CA file {ca} holds no PEM certificate ({error}); give ca.pem") from None
    except OSError as error:
        raise TlsError(f"cannot read the CA file {ca}: {error.strerror or error}") from None


@dataclasses.dataclass(frozen=True, slots=True)
class PeerTransport:
    """How this server reaches the admin APIs of the site, its own included: plain HTTP, or
    TLS checking each server's certificate against the site CA by the server's name."""

    context: ssl.SSLContext | None = None

    @classmethod
    def for_config(cls, config: object) -> PeerTransport:
        tls = AdminTls.from_config(config)
        return cls(tls.client_context() if tls is not None else None)

    @property
    def scheme(self) -> str:
        return "https" if self.context is not None else "http"

    def url(self, address: str, path: str) -> URL:
        return URL(f"{self.scheme}://{address}{path}", encoded=True)

    def target(self, address: str) -> str:
        """What a request to ``address`` is signed for (`pvsd.admin_auth.target`)."""
        return admin_auth.target(address, default_port=443 if self.context else 80)

    def options(self, server: str) -> dict[str, Any]:
        """aiohttp request options for a request to server ``server``."""
        if self.context is None:
            return {}
        return {"ssl": self.context, "server_hostname": server}


def peer_subject(transport: _Transport | None) -> str | None:
    """The subject of the client certificate the connection showed (checked against the
    site CA), as ``CN=s1,O=...``; None without one."""
    if transport is None:
        return None
    certificate = transport.get_extra_info("peercert")
    if not certificate:
        return None
    parts = [
        f"{_SHORT_NAMES.get(key, key)}={value}"
        for relative in certificate.get("subject", ())
        for key, value in relative
    ]
    return ",".join(parts) or None


# -- making the site's certificates ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Made:
    ca: Path
    ca_key: Path
    new_ca: bool
    servers: dict[str, tuple[Path, Path]]
    clients: dict[str, tuple[Path, Path]]


def check_host(text: str) -> str:
    """An IP address or a DNS name for a certificate; ValueError otherwise."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOST.fullmatch(text) is None:
        raise ValueError(f"{text!r} is neither an IP address nor a DNS name")
    return text.lower()


def make_site_certificates(
    out: Path,
    servers: Mapping[str, Sequence[str]],
    clients: Sequence[str] = (),
    *,
    days: int = CERTIFICATE_DAYS,
    now: datetime.datetime | None = None,
) -> Made:
    """The site CA in ``out`` (made, or reused when ``ca.pem`` and ``ca.key`` are there: a
    server added later gets a certificate of the same CA) and, signed by it, one
    certificate and key per server (``NAME.pem``, ``NAME.key``: for the server name and each
    of its hosts) and per client. Refuses to overwrite any file; keys are written mode 600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(hours=1)  # clocks of a site may differ a little
    ca_path, ca_key_path = out / CA_FILE, out / CA_KEY_FILE
    names = [*servers, *clients]
    for name in names:
        for path in (out / f"{name}.pem", out / f"{name}.key"):
            if path.exists():
                raise TlsError(f"{path} exists; remove it to make a new one, or choose another "
                               "--out")
    if len(set(names)) != len(names):
        raise TlsError("each server and client name may be given once")
    out.mkdir(parents=True, exist_ok=True)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    new_ca = not ca_path.exists() and not ca_key_path.exists()
    if new_ca:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pvs site"),
            # unique: a CA of another site (or a new one) must not pass for this one by name
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"pvs site CA {now:%Y-%m-%d} {secrets.token_hex(4)}"
            ),
        ])
        ca_certificate = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_key_path, pem_key(ca_key), 0o600)
        _write(ca_path, ca_certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    else:
        try:
            ca_certificate = x509.load_pem_x509_certificate(ca_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        except FileNotFoundError as error:
            raise TlsError(
                f"{error.filename} is missing beside the other half of the site CA; give both "
                f"{CA_FILE} and {CA_KEY_FILE}, or an empty --out for a new site CA"
            ) from None
        except (ValueError, TypeError) as error:
            raise TlsError(f"the site CA in {out} cannot be read ({error}); give the "
                           f"{CA_FILE} and {CA_KEY_FILE} pvsctl site certs made") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise TlsError(f"{ca_key_path} is not the key pvsctl site certs makes")
        ca_key = loaded

    def issue(name: str, hosts: Sequence[str], usages: list[x509.ObjectIdentifier],
              ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if hosts:
            alternatives: list[x509.GeneralName] = []
            for host in dict.fromkeys(hosts):
                try:
                    alternatives.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alternatives.append(x509.DNSName(host))
            builder = builder.add_extension(
                x509.SubjectAlternativeName(alternatives), critical=False
            )
        certificate = builder.sign(ca_key, hashes.SHA256())
        pem, key_path = out / f"{name}.pem", out / f"{name}.key"
        _write(key_path, pem_key(key), 0o600)
        _write(pem, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        return pem, key_path

    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    made_servers = {
        name: issue(name, [name, *hosts], both) for name, hosts in servers.items()
    }
    made_clients = {
        name: issue(name, [], [ExtendedKeyUsageOID.CLIENT_AUTH]) for name in clients
    }
    return Made(ca_path, ca_key_path, new_ca, made_servers, made_clients)


def _write(path: Path, data: bytes, mode: int) -> None:
    """A new file (never an existing one), with its mode from the start."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise TlsError(f"{path} exists; remove it to make a new one") from None
    except OSError as error:
        raise TlsError(f"cannot write {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
