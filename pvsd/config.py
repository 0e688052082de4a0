"""pvsd configuration: read once at the edge (TOML file, then flags), validated, frozen."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

DEFAULT_PORT = 6910
DEFAULT_BACKGROUND_THREADS = max(1, min(4, os.cpu_count() or 1))


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
    max_request: int = 4 * 1024 * 1024
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

    @property
    def listen(self) -> str:
        return format_address(self.listen_host, self.listen_port)

    @property
    def admin(self) -> str:
        return format_address(self.admin_host, self.admin_port) if self.admin_host else ""


def parse_address(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, HOST or :PORT."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"address {text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"address {text!r}: expected ':PORT' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"address {text!r}: port must be 0..65535")
    return host or "0.0.0.0", port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvsd", description="pvs server: streams vDisks to targets."
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--name", help="server name (default: host name)")
    parser.add_argument("--listen", help=f"HOST:PORT to serve targets on (default :{DEFAULT_PORT})")
    parser.add_argument(
        "--store", action="append", type=Path, help="vDisk store directory (repeatable)"
    )
    parser.add_argument(
        "--shared-store", action="append", type=Path, help="store shared by several servers"
    )
    parser.add_argument(
        "--peer", action="append", help="stream HOST:PORT of another server of the site"
    )
    parser.add_argument("--key-file", type=Path, help="site key (make one: pvsctl site keygen)")
    parser.add_argument("--power", type=float, help="power rating, 0.1 to 1000 (default 1)")
    parser.add_argument("--admin", help="HOST:PORT of the admin API (default: listen port + 1)")
    parser.add_argument("--advertise", help="stream HOST:PORT to tell peers and targets")
    parser.add_argument("--subnet", action="append", help="CIDR this server is on (repeatable)")
    parser.add_argument("--peer-timeout", type=float, help="seconds before a silent peer is down")
    parser.add_argument("--heartbeat-interval", type=float, help="seconds between heartbeats")
    parser.add_argument("--drain-timeout", type=float, help="seconds targets get to move away")
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--max-request", type=int, help="largest request in bytes")
    parser.add_argument("--max-in-flight", type=int, help="outstanding requests per target")
    parser.add_argument("--idle-timeout", type=float, help="seconds of silence before closing")
    parser.add_argument("--handshake-timeout", type=float, help="seconds to complete HELLO+LOGIN")
    parser.add_argument("--watch-interval", type=float, help="seconds between image change checks")
    parser.add_argument(
        "--scrub-rate", type=float, help="bytes/s the background scrub reads (0: off)"
    )
    parser.add_argument("--scrub-interval", type=float, help="seconds between scrub passes")
    parser.add_argument(
        "--io-threads", type=int, help="worker threads for serving I/O (default 16)"
    )
    parser.add_argument(
        "--background-threads", type=int,
        help=f"worker threads for hashing and scrub (default {DEFAULT_BACKGROUND_THREADS})",
    )
    parser.add_argument(
        "--stall-timeout", type=float,
        help="seconds before a store that does not answer is treated as stalled (default 1)",
    )
    parser.add_argument(
        "--replication-rate", type=float, help="bytes/s one copy from a peer fetches (0: no limit)"
    )
    parser.add_argument(
        "--rebalance", choices=("on", "off"), help="automatic rebalancing (default on)"
    )
    parser.add_argument(
        "--rebalance-trigger", type=float, metavar="PERCENT",
        help="rebalance a server this far above the average load (default 25)",
    )
    parser.add_argument(
        "--rebalance-interval", type=float, metavar="SECONDS",
        help="seconds between rebalancing decisions (default 60)",
    )
    parser.add_argument(
        "--boot-window", type=float, metavar="SECONDS",
        help="a fresh login this recent is a booting target (default 120)",
    )
    return parser


def load(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(_read_file(args.config))
    for key in (
        "name", "log_json", "log_level", "max_request", "max_in_flight", "idle_timeout",
        "handshake_timeout", "watch_interval", "power", "admin", "advertise", "key_file",
        "peer_timeout", "heartbeat_interval", "drain_timeout", "scrub_rate", "scrub_interval",
        "io_threads", "background_threads", "stall_timeout", "replication_rate",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in ("rebalance_trigger", "rebalance_interval", "boot_window"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.rebalance is not None:
        values["rebalance"] = args.rebalance == "on"
    if args.listen is not None:
        values["listen"] = args.listen
    if args.store:
        values["stores"] = [str(p) for p in args.store]
    if args.shared_store:
        values["shared_stores"] = [str(p) for p in args.shared_store]
    if args.peer:
        values["peers"] = args.peer
    if args.subnet:
        values["subnets"] = args.subnet
    return from_mapping(values)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path}: not valid TOML: {error}") from None


def from_mapping(values: dict[str, Any]) -> Config:
    known = {f.name for f in dataclasses.fields(Config)} | {"listen", "admin", "key_file"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; see docs/deploy.md")
    values = dict(values)
    if "listen" in values:
        values["listen_host"], values["listen_port"] = parse_address(str(values.pop("listen")))
    values["stores"] = tuple(Path(p) for p in values.get("stores", ()))
    values["shared_stores"] = tuple(Path(p) for p in values.get("shared_stores", ()))
    values["peers"] = tuple(
        format_address(*parse_address(str(p))) for p in values.get("peers", ())
    )
    values["subnets"] = tuple(str(n) for n in values.get("subnets", ()))
    values.setdefault("name", socket.gethostname().split(".")[0])
    key_file = values.pop("key_file", None)
    if key_file is not None:
        values["site_key"] = read_key(Path(str(key_file)))
    admin = values.pop("admin", None)
    if admin is not None:
        if str(admin) in ("", "off", "none"):
            values["admin_host"], values["admin_port"] = "", 0
        else:
            values["admin_host"], values["admin_port"] = parse_address(str(admin))
    elif values.get("site_key"):
        port = int(values.get("listen_port", DEFAULT_PORT))
        values["admin_host"] = values.get("listen_host", "0.0.0.0")
        values["admin_port"] = port + 1 if port else 0
    try:
        config = Config(**values)
    except TypeError as error:
        raise ConfigError(f"bad setting: {error}") from None
    _validate(config)
    return config


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
    if not config.stores and not config.shared_stores:
        raise ConfigError("no vDisk store: give --store DIR or stores = [...] in the config")
    if config.peers and not config.site_key:
        raise ConfigError(
            "peers are configured but no site key: give --key-file FILE (pvsctl site keygen)"
        )
    if config.admin_host and not config.site_key:
        raise ConfigError(
            "the admin API needs the site key to authenticate requests: give --key-file FILE "
            "(pvsctl site keygen), or --admin off"
        )
    if config.peers and not config.advertise and _wildcard(config.listen_host):
        raise ConfigError(
            f"listening on {config.listen} with peers: give --advertise HOST:PORT (the address "
            "peers and targets should use), or listen on that address"
        )
    if not 0.1 <= config.power <= 1000:
        raise ConfigError("power must be between 0.1 and 1000")
    if len(config.subnets) > 8:
        raise ConfigError("at most 8 subnets per server (they travel in every heartbeat)")
    for subnet in config.subnets:
        try:
            ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            raise ConfigError(f"subnet {subnet!r} is not a network such as 10.1.0.0/24") from None
    if not 4096 <= config.max_request <= 32 * 1024 * 1024:
        raise ConfigError("max_request must be between 4096 and 33554432 bytes")
    if not 1 <= config.max_in_flight <= 4096:
        raise ConfigError("max_in_flight must be between 1 and 4096")
    for key in (
        "handshake_timeout", "idle_timeout", "watch_interval", "drain_timeout",
        "heartbeat_interval", "peer_timeout", "inventory_interval", "scrub_interval",
        "stall_timeout",
    ):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be positive")
    if not 1 <= config.io_threads <= 1024:
        raise ConfigError("io_threads must be between 1 and 1024")
    if not 1 <= config.background_threads <= 64:
        raise ConfigError("background_threads must be between 1 and 64")
    if config.replication_rate < 0:
        raise ConfigError("replication_rate must be 0 (no limit) or a positive number of bytes/s")
    if config.scrub_rate < 0:
        raise ConfigError("scrub_rate must be 0 (off) or a positive number of bytes per second")
    if not isinstance(config.rebalance, bool):
        raise ConfigError("rebalance must be true or false (automatic rebalancing on or off)")
    if not 1 <= config.rebalance_trigger <= 1000:
        raise ConfigError("rebalance_trigger must be a percentage between 1 and 1000 (default 25)")
    if not 0.1 <= config.rebalance_interval <= 86400:
        raise ConfigError("rebalance_interval must be between 0.1 and 86400 seconds (default 60)")
    if not 0 <= config.boot_window <= 86400:
        raise ConfigError("boot_window must be between 0 and 86400 seconds (default 120)")
    if not config.name or len(config.name) > 64:
        raise ConfigError("name must be 1..64 characters")
