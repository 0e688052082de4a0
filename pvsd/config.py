"""pvsd configuration: read once at the edge (TOML file, then flags), validated, frozen.

The file and the flags are checked together against one strict schema (`Settings`, pydantic):
a string is never taken for a number or a list, nor a number for an address, and a key that is
not a setting is refused with the list of those that are. Every refusal is one line naming
where the value came from (the file and key, or the flag), what was expected and what was
found, and pvsd exits 2 before it listens anywhere. What passes becomes the frozen `Config`
the rest of pvsd reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from pvs_protocol import addresses
from pvs_protocol.addresses import format_address as format_address
from pvs_protocol.sizes import parse_rate, parse_size
from pvsd.names import InvalidName, validate_server_name
from pvsd.version import add_version_option

DEFAULT_PORT = 6910
DEFAULT_BOOT_PORT = 6912
"""The boot files' port when ``boot_listen`` gives a host alone (6910 streams, 6911 is the
admin API)."""
DEFAULT_BACKGROUND_THREADS = max(1, min(4, os.cpu_count() or 1))
MIB = 1024 * 1024


class ConfigError(Exception):
    """A setting is wrong; the message names it and says what to write instead."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    name: str
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    stores: tuple[Path, ...] = ()
    log_json: bool = False
    log_level: str = "info"
    max_request: int = 4 * MIB
    """Largest READ/WRITE a target may send; targets may ask for less."""
    max_in_flight: int = 64
    """Requests one target may have outstanding: bounds what a slow target makes us buffer."""
    handshake_timeout: float = 5.0
    """HELLO and LOGIN must complete within this many seconds."""
    idle_timeout: float = 60.0
    """A session that sends nothing (not even a keepalive) for this long is closed."""
    watch_interval: float = 1.0
    """How often each image is checked for changes (its identity is withdrawn at once)."""
    drain_timeout: float = 10.0
    """On stop, how long targets get to log in elsewhere before their connections are closed."""
    shared_stores: tuple[Path, ...] = ()
    """Stores that several servers mount: their replicas are identical by construction."""
    peers: tuple[str, ...] = ()
    """Stream addresses (HOST:PORT) of the other servers of the site."""
    site_key: bytes = dataclasses.field(default=b"", repr=False)
    """Authenticates the coordination channel and the admin API (from key_file)."""
    power: float = 1.0
    """Power rating: a server rated 2 takes twice the targets of one rated 1."""
    admin_host: str = ""
    admin_port: int = 0
    """The admin API (HTTP + JSON); empty host: none."""
    advertise: str = ""
    """The stream address peers and targets are told to use; defaults to the listen address."""
    subnets: tuple[str, ...] = ()
    """Networks this server is on, for subnet affinity; default: the listen address's /24."""
    heartbeat_interval: float = 0.5
    peer_timeout: float = 3.0
    """A peer not heard from for this long is marked down (and no login goes to it)."""
    inventory_interval: float = 5.0
    """Replica inventory is re-sent this often (and at once on every change)."""
    scrub_rate: float = 200e6
    """Bytes per second the background scrub reads (one replica at a time); 0: no scrub."""
    scrub_interval: float = 86400.0
    """Seconds between the end of one scrub pass over all replicas and the next."""
    io_threads: int = 16
    """Worker threads for serving I/O (reads that miss the page cache, writes, fdatasync):
    a pool of their own, so that hashing and scrubbing never make a target's read wait."""
    stream_workers: int = 0
    """Processes that serve logged-in read-only sessions (`pvsd.workers`), so that streaming
    uses more than one core; 0: every session is served by this process."""
    background_threads: int = DEFAULT_BACKGROUND_THREADS
    """Worker threads for manifests, verification, re-checks and the scrub: few, since they
    compete with serving for the disk and the CPU and nobody waits on them."""
    stall_timeout: float = 1.0
    """A read or write not finished in a worker thread after this many seconds is answered
    with a retryable IO_ERROR, and its store counts as stalled (not served, its targets sent
    elsewhere) until its late requests finish."""
    replication_rate: float = 0
    """Bytes per second one copy from another server may fetch (pvsctl vdisk replicate
    --rate overrides it per copy); 0: no limit."""
    rebalance: bool = True
    """Site setting (the same on every server): move targets from a server more than
    ``rebalance_trigger`` percent above the average load to the least busy, every
    ``rebalance_interval`` seconds and when a server comes back (`pvsd.rebalance`)."""
    rebalance_trigger: float = 25.0
    rebalance_interval: float = 60.0
    boot_window: float = 120.0
    """A target that logged in without a pinned identity (a fresh boot) this recently is
    booting: rebalancing waits while more than 20% of a server's targets are."""
    admin_tls_cert: Path | None = None
    """The admin API's certificate (PEM); with ``admin_tls_key`` and ``admin_tls_ca`` the
    admin API speaks HTTPS only. All three or none."""
    admin_tls_key: Path | None = None
    admin_tls_ca: Path | None = None
    """The site's CA: clients and peers must present a certificate it signed."""
    max_connections_per_source: int = 64
    """Connections one source IP address may hold at once, on the stream port and on the boot
    listener each: one host cannot take every descriptor of the server."""
    reply_budget: int = 256 * MIB
    """Bytes of replies queued but not yet sent, over all sessions of the server: clients
    that do not read their replies cannot make it hold more."""
    metrics: bool = True
    """Serve Prometheus metrics at /metrics on the admin port."""
    boot_host: str = ""
    boot_port: int = 0
    """Kernels, initramfs and iPXE scripts for network boot (plain HTTP, `pvsd.boot_http`);
    empty host: none."""
    boot_max_connections: int = 256
    """Connections the boot listener keeps at once (`pvsd.boot_limits`): a boot storm of more
    machines than this, each fetching its kernel and initramfs at the same moment, needs more."""
    boot_request_timeout: float = 10.0
    """A boot connection must send a whole request within this many seconds of opening, or of
    its previous answer (an idle keep-alive connection is closed then too)."""

    @property
    def listen(self) -> str:
        return format_address(self.listen_host, self.listen_port)

    @property
    def admin(self) -> str:
        return format_address(self.admin_host, self.admin_port) if self.admin_host else ""

    @property
    def boot_listen(self) -> str:
        return format_address(self.boot_host, self.boot_port) if self.boot_host else ""

    @property
    def admin_tls(self) -> bool:
        return self.admin_tls_cert is not None


def parse_address(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, HOST or :PORT (`pvs_protocol.addresses`), refused as a
    `ConfigError`: what callers of the configuration catch."""
    try:
        return addresses.parse_address(text, default_port=default_port)
    except addresses.AddressError as error:
        raise ConfigError(str(error)) from None


# -- the schema -----------------------------------------------------------------------------
# One field per setting a file or a flag may give; its description is what the error says was
# expected. Ranges are constraints here; checks that involve several settings are in
# `_validate`.

_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Config)
    if f.default is not dataclasses.MISSING
}
_SECONDS = "a positive number of seconds"
_ADDRESS = 'an address "HOST:PORT" (a string)'
_STORES = 'a list of directories, such as ["/var/lib/pvs/store"]'
_PATH = "the path of a file (a string)"


def _setting(key: str, expected: str, **constraints: Any) -> Any:
    """A field whose default is the `Config` default (or none) and whose description is
    what an error says was expected."""
    default = _DEFAULTS.get(key)
    if isinstance(default, tuple):
        return Field(default_factory=list, description=expected, **constraints)
    return Field(default=default, description=expected, **constraints)


class Settings(BaseModel):
    """What the TOML file and the flags may say, checked strictly."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = Field(
        default="", description="a server name: 1 to 64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit (a string)",
    )
    listen: str = Field(default=f":{DEFAULT_PORT}", description=_ADDRESS)
    admin: str = Field(default="", description=f'{_ADDRESS} or "off"')
    advertise: str = _setting("advertise", _ADDRESS)
    key_file: str = Field(default="", description="the path of the site key file (a string)")
    stores: list[str] = _setting("stores", _STORES)
    shared_stores: list[str] = _setting("shared_stores", _STORES)
    peers: list[str] = _setting(
        "peers", 'a list of "HOST:PORT" strings, such as ["10.1.1.12:6910"]'
    )
    subnets: list[str] = _setting(
        "subnets", 'a list of at most 8 networks, such as ["10.1.1.0/24"]', max_length=8
    )
    log_json: bool = _setting("log_json", "true or false")
    log_level: Literal["debug", "info", "warning", "error"] = _setting(
        "log_level", 'one of "debug", "info", "warning", "error"'
    )
    max_request: int = _setting(
        "max_request", "a whole number of bytes from 4096 to 33554432",
        ge=4096, le=32 * MIB,
    )
    max_in_flight: int = _setting(
        "max_in_flight", "a whole number from 1 to 4096", ge=1, le=4096
    )
    handshake_timeout: float = _setting("handshake_timeout", _SECONDS, gt=0)
    idle_timeout: float = _setting("idle_timeout", _SECONDS, gt=0)
    watch_interval: float = _setting("watch_interval", _SECONDS, gt=0)
    drain_timeout: float = _setting("drain_timeout", _SECONDS, gt=0)
    power: float = _setting("power", "a number from 0.1 to 1000", ge=0.1, le=1000)
    heartbeat_interval: float = _setting("heartbeat_interval", _SECONDS, gt=0)
    peer_timeout: float = _setting("peer_timeout", _SECONDS, gt=0)
    inventory_interval: float = _setting("inventory_interval", _SECONDS, gt=0)
    scrub_rate: float | str = _setting(
        "scrub_rate", 'bytes per second: 0 (no scrub), a number, or a rate such as "200M"'
    )
    scrub_interval: float = _setting("scrub_interval", _SECONDS, gt=0)
    io_threads: int = _setting("io_threads", "a whole number from 1 to 1024", ge=1, le=1024)
    stream_workers: int = _setting(
        "stream_workers", "a whole number from 0 (none) to 64", ge=0, le=64
    )
    background_threads: int = _setting(
        "background_threads", "a whole number from 1 to 64", ge=1, le=64
    )
    stall_timeout: float = _setting("stall_timeout", _SECONDS, gt=0)
    replication_rate: float | str = _setting(
        "replication_rate", 'bytes per second: 0 (no limit), a number, or a rate such as "100M"'
    )
    rebalance: bool = _setting("rebalance", "true or false (automatic rebalancing on or off)")
    rebalance_trigger: float = _setting(
        "rebalance_trigger", "a percentage from 1 to 1000 (default 25)", ge=1, le=1000
    )
    rebalance_interval: float = _setting(
        "rebalance_interval", "a number of seconds from 0.1 to 86400 (default 60)",
        ge=0.1, le=86400,
    )
    boot_window: float = _setting(
        "boot_window", "a number of seconds from 0 to 86400 (default 120)", ge=0, le=86400
    )
    admin_tls_cert: str = Field(default="", description=_PATH + " holding a PEM certificate")
    admin_tls_key: str = Field(default="", description=_PATH + " holding a PEM private key")
    admin_tls_ca: str = Field(default="", description=_PATH + " holding the site's CA (PEM)")
    max_connections_per_source: int = _setting(
        "max_connections_per_source", "a whole number from 1 to 100000", ge=1, le=100_000
    )
    reply_budget: int | str = _setting(
        "reply_budget", 'a size in bytes of at least 1 MiB, such as 268435456 or "256M"'
    )
    metrics: bool = _setting("metrics", "true or false (serve /metrics on the admin port)")
    boot_listen: str = Field(
        default="", description=f'{_ADDRESS} for network boot (plain HTTP), or "off"'
    )
    boot_max_connections: int = _setting(
        "boot_max_connections", "a whole number from 1 to 10000", ge=1, le=10_000
    )
    boot_request_timeout: float = _setting(
        "boot_request_timeout", "a number of seconds from 0.1 to 3600", ge=0.1, le=3600
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        try:
            validate_server_name(value)
        except InvalidName as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("listen", "advertise", "admin")
    @classmethod
    def _address(cls, value: str) -> str:
        if value and value not in ("off", "none"):
            _address_of(value)
        return value

    @field_validator("boot_listen")
    @classmethod
    def _boot_listen(cls, value: str) -> str:
        if value and value not in ("off", "none"):
            try:
                parse_address(value, default_port=DEFAULT_BOOT_PORT)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: list[str]) -> list[str]:
        for peer in value:
            _address_of(peer)
        return value

    @field_validator("subnets")
    @classmethod
    def _subnets(cls, value: list[str]) -> list[str]:
        for subnet in value:
            try:
                ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                raise ValueError(f"{subnet!r} is not a network such as 10.1.0.0/24") from None
        return value

    @field_validator("scrub_rate", "replication_rate")
    @classmethod
    def _rate(cls, value: float | str) -> float:
        """A number of bytes per second, or the size notation of every tool (``200M``,
        ``50MiB/s``): pvsctl's --rate reads the same."""
        if isinstance(value, str):
            try:
                rate = float(value)
            except ValueError:
                rate = float(parse_rate(value))
        else:
            rate = value
        if not rate >= 0 or rate == float("inf"):
            raise ValueError(f"{rate!r} is not 0 or a positive number of bytes per second")
        return rate

    @field_validator("reply_budget")
    @classmethod
    def _reply_budget(cls, value: int | str) -> int:
        size = parse_size(value) if isinstance(value, str) else value
        if size < MIB:
            raise ValueError(
                f"{value!r} is less than 1 MiB: give at least 1M (one largest reply must fit)"
            )
        return size


KNOWN_SETTINGS = tuple(sorted(Settings.model_fields))
_FLAGS = {"stores": "--store", "shared_stores": "--shared-store", "peers": "--peer",
          "subnets": "--subnet"}


def _address_of(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ConfigError as error:
        raise ValueError(str(error)) from None


# -- the command line -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """pvsd's flags: each is also a setting of the TOML file (``--peer-timeout`` is
    ``peer_timeout``), and wins over it."""
    parser = argparse.ArgumentParser(
        prog="pvsd", description="pvs server: streams vDisks to targets. Each flag is also a "
        "setting of the --config file (--peer-timeout is peer_timeout); a flag wins.",
    )
    add_version_option(parser)
    add = parser.add_argument
    add("--config", type=Path, metavar="FILE", help="TOML configuration file")
    add("--name", help="server name, unique in the site (default: the host name)")
    add("--listen", metavar="HOST:PORT",
        help=f"where targets connect, and peers over UDP (default :{DEFAULT_PORT})")
    add("--store", action="append", type=Path, metavar="DIR",
        help="vDisk store directory (repeatable)")
    add("--shared-store", action="append", type=Path, metavar="DIR",
        help="store that several servers mount (repeatable)")
    add("--peer", action="append", metavar="HOST:PORT",
        help="stream address of another server of the site (repeatable)")
    add("--key-file", type=Path, metavar="FILE",
        help="the site key (make one: pvsctl site keygen)")
    add("--power", type=float, help="power rating, 0.1 to 1000 (default 1)")
    add("--admin", metavar="HOST:PORT",
        help="admin API address, or off (default: the listen port + 1 with a site key)")
    add("--advertise", metavar="HOST:PORT",
        help="stream address to tell peers and targets (default: the listen address)")
    add("--subnet", action="append", metavar="CIDR",
        help="a network this server is on, for subnet affinity (repeatable)")
    add("--peer-timeout", type=float, metavar="SECONDS",
        help="a peer not heard from for this long is down (default 3)")
    add("--heartbeat-interval", type=float, metavar="SECONDS",
        help="seconds between heartbeats to the peers (default 0.5)")
    add("--drain-timeout", type=float, metavar="SECONDS",
        help="on stop, how long targets get to move away (default 10)")
    add("--log-json", action="store_true", default=None, help="log JSON lines")
    add("--log-level", choices=["debug", "info", "warning", "error"],
        help="least important level logged (default info)")
    add("--max-request", type=int, metavar="BYTES",
        help="largest READ or WRITE a target may send (default 4194304)")
    add("--max-in-flight", type=int, metavar="COUNT",
        help="requests one target may have outstanding (default 64)")
    add("--idle-timeout", type=float, metavar="SECONDS",
        help="a silent session is closed after this long (default 60)")
    add("--handshake-timeout", type=float, metavar="SECONDS",
        help="HELLO and LOGIN must be done within this (default 5)")
    add("--watch-interval", type=float, metavar="SECONDS",
        help="seconds between checks of the images for changes (default 1)")
    add("--scrub-rate", metavar="RATE",
        help="bytes/s the background scrub reads, e.g. 200M (0: no scrub; default 200000000)")
    add("--scrub-interval", type=float, metavar="SECONDS",
        help="seconds between scrub passes (default 86400)")
    add("--io-threads", type=int, metavar="COUNT",
        help="worker threads for serving I/O (default 16)")
    add("--stream-workers", type=int, metavar="COUNT",
        help="processes serving logged-in read-only sessions (default 0: none)")
    add("--background-threads", type=int, metavar="COUNT",
        help=f"worker threads for hashing and scrub (default {DEFAULT_BACKGROUND_THREADS})")
    add("--stall-timeout", type=float, metavar="SECONDS",
        help="a store that does not answer for this long is stalled (default 1)")
    add("--replication-rate", metavar="RATE",
        help="bytes/s one copy from a peer fetches, e.g. 100M (0: no limit, the default)")
    add("--rebalance", choices=("on", "off"), help="automatic rebalancing (default on)")
    add("--rebalance-trigger", type=float, metavar="PERCENT",
        help="rebalance a server this far above the average load (default 25)")
    add("--rebalance-interval", type=float, metavar="SECONDS",
        help="seconds between rebalancing decisions (default 60)")
    add("--boot-window", type=float, metavar="SECONDS",
        help="a fresh login this recent is a booting target (default 120)")
    add("--admin-tls-cert", type=Path, metavar="FILE",
        help="PEM certificate of the admin API (with --admin-tls-key and --admin-tls-ca: HTTPS)")
    add("--admin-tls-key", type=Path, metavar="FILE", help="PEM private key of the admin API")
    add("--admin-tls-ca", type=Path, metavar="FILE",
        help="PEM CA of the site: peers are checked against it; a client certificate is "
        "optional but must be signed by it")
    add("--max-connections-per-source", type=int, metavar="COUNT",
        help="connections one source address may hold, on the stream port and on the boot "
        "listener each (default 64)")
    add("--reply-budget", metavar="SIZE",
        help="bytes of unsent replies over all targets, e.g. 512M (default 256M)")
    add("--metrics", choices=("on", "off"),
        help="Prometheus /metrics on the admin port (default on)")
    add("--boot-listen", metavar="HOST:PORT",
        help="serve kernels, initramfs and iPXE scripts for network boot there (plain HTTP, "
        f"unauthenticated; port {DEFAULT_BOOT_PORT} if only a host; default off)")
    add("--boot-max-connections", type=int, metavar="COUNT",
        help="connections the boot listener keeps at once (default 256)")
    add("--boot-request-timeout", type=float, metavar="SECONDS",
        help="a boot connection must send a whole request within this (default 10)")
    return parser


def load(argv: list[str] | None = None) -> Config:
    """The configuration from the command line and the file it names (flags win)."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    source = ""
    if args.config:
        source = str(args.config)
        values.update(_read_file(args.config))
        origins.update({key: f"{source}: {key}" for key in values})
    given: dict[str, Any] = {}
    for key in (
        "name", "log_json", "log_level", "max_request", "max_in_flight", "idle_timeout",
        "handshake_timeout", "watch_interval", "power", "admin", "advertise", "key_file",
        "peer_timeout", "heartbeat_interval", "drain_timeout", "scrub_rate", "scrub_interval",
        "io_threads", "background_threads", "stall_timeout", "replication_rate", "listen",
        "stream_workers",
        "rebalance_trigger", "rebalance_interval", "boot_window", "admin_tls_cert",
        "admin_tls_key", "admin_tls_ca", "max_connections_per_source", "reply_budget",
        "boot_listen", "boot_max_connections", "boot_request_timeout",
    ):
        value = getattr(args, key)
        if value is not None:
            given[key] = str(value) if isinstance(value, Path) else value
    for key in ("rebalance", "metrics"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key) == "on"
    for key, flag in (("store", "stores"), ("shared_store", "shared_stores"),
                      ("peer", "peers"), ("subnet", "subnets")):
        if getattr(args, key):
            given[flag] = [str(item) for item in getattr(args, key)]
    values.update(given)
    origins.update({key: _FLAGS.get(key, "--" + key.replace("_", "-")) for key in given})
    return from_mapping(values, origins=origins, source=source)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: not valid TOML: {error}") from None


class _Invalid(Exception):
    """A value that passed the schema but not a check involving the site or other settings;
    ``key`` is the setting to blame (None: several), to be named with where it came from."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def from_mapping(
    values: Mapping[str, Any], *, origins: Mapping[str, str] | None = None, source: str = ""
) -> Config:
    """Check settings as a file and flags give them, and make the frozen `Config`.

    ``origins`` says where each key came from ("FILE: key" or "--flag"), ``source`` is the
    file, for errors that involve several settings; raise `ConfigError` naming them."""
    origins = origins or {}

    def where(key: str | None) -> str:
        if key is None:
            return source
        return origins.get(key) or (f"{source}: {key}" if source else key)

    try:
        settings = Settings.model_validate(dict(values))
    except ValidationError as error:
        raise ConfigError(_describe(error, values, where)) from None
    try:
        config = _config_of(settings)
        _validate(config)
    except _Invalid as invalid:
        place = where(invalid.key)
        raise ConfigError(f"{place}: {invalid.message}" if place else invalid.message) from None
    return config


def _config_of(settings: Settings) -> Config:
    given = settings.model_fields_set
    values: dict[str, Any] = {
        key: getattr(settings, key) for key in given
        if key in _DEFAULTS and key not in ("stores", "shared_stores", "peers", "subnets")
    }
    values["name"] = settings.name if "name" in given else _host_name()
    values["listen_host"], values["listen_port"] = parse_address(settings.listen)
    values["stores"] = tuple(Path(p) for p in settings.stores)
    values["shared_stores"] = tuple(Path(p) for p in settings.shared_stores)
    values["peers"] = tuple(format_address(*parse_address(p)) for p in settings.peers)
    values["subnets"] = tuple(settings.subnets)
    for key in ("admin_tls_cert", "admin_tls_key", "admin_tls_ca"):
        values[key] = Path(getattr(settings, key)) if getattr(settings, key) else None
    if "key_file" in given:
        try:
            values["site_key"] = read_key(Path(settings.key_file))
        except ConfigError as error:
            raise _Invalid("key_file", str(error)) from None
    if "admin" in given:
        if settings.admin in ("", "off", "none"):
            values["admin_host"], values["admin_port"] = "", 0
        else:
            values["admin_host"], values["admin_port"] = parse_address(settings.admin)
    elif values.get("site_key"):
        port = values["listen_port"]
        values["admin_host"] = values["listen_host"]
        values["admin_port"] = port + 1 if port else 0
    if settings.boot_listen not in ("", "off", "none"):
        values["boot_host"], values["boot_port"] = parse_address(
            settings.boot_listen, default_port=DEFAULT_BOOT_PORT
        )
    return Config(**values)


def _host_name() -> str:
    """The default server name: the host's, which must then be a valid name too."""
    name = socket.gethostname().split(".")[0]
    try:
        return validate_server_name(name)
    except InvalidName as error:
        raise _Invalid("name", f"the host name cannot be the server name: {error}; give "
                       "name = \"...\" or --name") from None


def _describe(
    error: ValidationError, values: Mapping[str, Any], where: Callable[[str | None], str]
) -> str:
    """One line for every setting refused: where, what was expected, what was found."""
    parts: list[str] = []
    seen: set[str] = set()
    for problem in error.errors():
        key = str(problem["loc"][0]) if problem["loc"] else ""
        if key in seen:
            continue
        seen.add(key)
        if problem["type"] == "extra_forbidden":
            parts.append(
                f"{where(key)}: unknown setting; known settings: {', '.join(KNOWN_SETTINGS)} "
                "(docs/deploy.md)"
            )
            continue
        cause = problem.get("ctx", {}).get("error") if problem["type"] == "value_error" else None
        if cause is not None:  # our own check: its message names the value and the rule
            parts.append(f"{where(key)}: {cause}")
            continue
        field = Settings.model_fields.get(key)
        expected = field.description if field is not None and field.description else "?"
        parts.append(f"{where(key)}: expected {expected}, found {_render(values.get(key))}")
    return "; ".join(parts)


def _render(value: object) -> str:
    """A value as the TOML file would show it, with its kind: "found the string "3""."""
    text = _toml(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, bool):
        return text
    if isinstance(value, str):
        return f"the string {text}"
    if isinstance(value, int | float):
        return f"the number {text}"
    if isinstance(value, list):
        return f"the list {text}"
    if isinstance(value, dict):
        return f"a table {text}"
    return text


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def read_key(path: Path) -> bytes:
    """A site key file holds at least 32 bytes of secret, as hex (what keygen writes) or raw."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"key file {path}: {error.strerror}") from None
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) < 32:
        raise ConfigError(
            f"key file {path}: needs at least 32 bytes of secret; make one with "
            "'pvsctl site keygen > FILE' and copy it to every server of the site"
        )
    return key


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _validate(config: Config) -> None:
    """What the schema cannot see alone: settings that need each other, and files."""
    if not config.stores and not config.shared_stores:
        raise _Invalid(None, "no vDisk store: give --store DIR or stores = [...] in the config")
    if config.peers and not config.site_key:
        raise _Invalid(
            "peers", "peers are configured but no site key: give --key-file FILE "
            "(pvsctl site keygen)",
        )
    if config.admin_host and not config.site_key:
        raise _Invalid(
            "admin", "the admin API needs the site key to authenticate requests: give "
            "--key-file FILE (pvsctl site keygen), or --admin off",
        )
    if config.peers and not config.advertise and _wildcard(config.listen_host):
        raise _Invalid(
            "listen", f"listening on {config.listen} with peers: give --advertise HOST:PORT "
            "(the address peers and targets should use), or listen on that address",
        )
    if config.reply_budget < config.max_request:
        raise _Invalid(
            "reply_budget", f"{config.reply_budget} bytes is less than max_request "
            f"({config.max_request}): one largest reply would not fit; raise it",
        )
    _validate_boot(config)
    _validate_tls(config)


def _validate_boot(config: Config) -> None:
    """Network boot needs a port of its own: the stream and admin ports speak other
    protocols."""
    if not config.boot_host:
        return
    for key, host, port in (
        ("listen", config.listen_host, config.listen_port),
        ("admin", config.admin_host, config.admin_port),
    ):
        same_host = host == config.boot_host or _wildcard(host) or _wildcard(config.boot_host)
        if host and port and port == config.boot_port and same_host:
            raise _Invalid(
                "boot_listen", f"{config.boot_listen} takes the port of {key} "
                f"({format_address(host, port)}): give network boot a port of its own "
                f"(e.g. {DEFAULT_BOOT_PORT})",
            )


def _validate_tls(config: Config) -> None:
    files = {
        "admin_tls_cert": config.admin_tls_cert, "admin_tls_key": config.admin_tls_key,
        "admin_tls_ca": config.admin_tls_ca,
    }
    given = [key for key, path in files.items() if path is not None]
    if not given:
        return
    if len(given) < len(files):
        missing = [key for key in files if key not in given]
        raise _Invalid(
            given[0], f"TLS for the admin API needs admin_tls_cert, admin_tls_key and "
            f"admin_tls_ca together; {', '.join(missing)} missing (give all three, or none "
            "for plain HTTP)",
        )
    if not config.admin_host:
        raise _Invalid(
            given[0], "TLS is set but the admin API is off (no key_file, or admin = \"off\")"
        )
    for key, path in files.items():
        assert path is not None
        try:
            with path.open("rb") as handle:
                handle.read(1)
        except OSError as error:
            raise _Invalid(
                key, f"cannot read {path}: {error.strerror}; give a readable PEM file "
                "(pvsd runs as user pvs)",
            ) from None
