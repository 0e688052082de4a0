"""Authenticating admin API requests with the site key, without I/O and without a clock.

Every request carries ``Authorization: PVS-HMAC ts=<ms>,mac=<hex>``, where ``mac`` is
HMAC-SHA256 under the site key of five lines::

    <ts>            milliseconds since the epoch, when the request was signed
    <METHOD>        upper case
    <HOST:PORT>     the server the request is meant for: its Host header, in `target` form
    <path?query>    exactly as sent in the request line
    <sha256(body)>  hex; of the empty string for a request without a body

A request signed more than `MAX_SKEW_MS` from the receiver's clock is refused, so a captured
request stops working half a minute later. Within that window a captured GET could be sent
again and only reveals what the captured answer already showed; a captured POST could change
the site again, so the receiver remembers each POST's MAC until its timestamp falls out of the
window (`ReplayCache`) and refuses a second one.

The same key signs for every server of a site, so the MAC alone would let a request captured
on its way to one server be replayed, within the window, to another (each has its own replay
memory). The signed ``HOST:PORT`` names the server the client dialled: a server accepts only
requests whose Host names itself (`names_this_server`: the address the connection arrived
on, directly or through a host name that resolves to it). Host is what the client knows: pvsctl
knows only the ``--admin`` address it was given, a server forwarding to a peer only the peer's
announced address.

The key authenticates; it does not encrypt. Without TLS (`pvsd.tls`), run the admin API on a
management network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import ipaddress
import re
from collections.abc import Callable, Collection

SCHEME = "PVS-HMAC"
MAX_SKEW_MS = 30_000
"""The same tolerance as the coordination channel: clocks of a site are kept by NTP."""
# The scheme is case-insensitive (RFC 9110, 11.1); the parameters are written as sign() does.
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_HEADER = re.compile(
    r"(?i:PVS-HMAC)\s+ts=(?P<ts>[0-9]{1,16})\s*,\s*mac=(?P<mac>[0-9a-fA-F]{64})\s*"
)
# RFC 3986 authority without userinfo: an IP literal in brackets or a name/IPv4, then a port.
_AUTHORITY = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]{2,45})\]|(?P<host>[A-Za-z0-9._-]{1,253}))(?::(?P<port>[0-9]{1,5}))?"
)


class AuthError(Exception):
    """A request was refused; ``reason`` is a short label counted in ``GET /v1/site``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True, slots=True)
class Signed:
    """A request whose MAC and time were checked: who it is meant for, and its MAC."""

    timestamp_ms: int
    mac: str
    target: str


class ReplayCache:
    """The MACs of mutating requests accepted recently, each kept until it would be stale.

    Bounded: once ``capacity`` MACs are inside the window, further mutating requests are
    refused until old ones expire (forgetting one early would let it be replayed). Only
    requests with a valid MAC get this far, so only a holder of the site key can fill it.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._expiry: dict[str, int] = {}
        self._queue: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, mac: str, timestamp_ms: int, now_ms: int) -> None:
        """Remember ``mac``; raise AuthError if it was seen and is still inside the window."""
        self._expire(now_ms)
        if mac in self._expiry:
            raise AuthError(
                "replayed", "this signed request was already accepted; sign each request anew"
            )
        if len(self._expiry) >= self.capacity:
            raise AuthError(
                "busy", f"more than {self.capacity} changes within {MAX_SKEW_MS // 1000} s; "
                "retry in a few seconds",
            )
        expiry = timestamp_ms + MAX_SKEW_MS
        self._expiry[mac] = expiry
        heapq.heappush(self._queue, (expiry, mac))

    def _expire(self, now_ms: int) -> None:
        while self._queue and self._queue[0][0] < now_ms:
            _, mac = heapq.heappop(self._queue)
            del self._expiry[mac]


def target(authority: str, *, default_port: int) -> str:
    """The one spelling of ``HOST[:PORT]`` that is signed: lower case, no trailing dot,
    IPv6 compressed in brackets, always a port (``default_port`` where HTTP leaves it out:
    80, or 443 with TLS). The client signs its address so and the server reads its Host
    header so, whichever way either wrote it. Raises ValueError for anything else."""
    match = _AUTHORITY.fullmatch(authority.strip())
    if match is None:
        raise ValueError(f"{authority[:80]!r} is not HOST:PORT")
    port = int(match["port"]) if match["port"] else default_port
    if not 0 < port < 65536:
        raise ValueError(f"{authority!r}: port must be 1..65535")
    if match["v6"]:
        try:
            return f"[{ipaddress.IPv6Address(match['v6']).compressed}]:{port}"
        except ValueError:
            raise ValueError(f"{authority!r}: not an IPv6 address in brackets") from None
    host = match["host"].lower().removesuffix(".")
    if not host:
        raise ValueError(f"{authority!r} has no host")
    return f"{host}:{port}"


def split_target(text: str) -> tuple[str, int]:
    """(host, port) of a `target` result; the host without brackets."""
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def canonical(method: str, target: str, path: str, body: bytes, timestamp_ms: int) -> bytes:
    """The text the MAC covers."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{timestamp_ms}\n{method.upper()}\n{target}\n{path}\n{digest}".encode()


def mac(key: bytes, method: str, target: str, path: str, body: bytes, timestamp_ms: int) -> str:
    text = canonical(method, target, path, body, timestamp_ms)
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, path: str, body: bytes, now_ms: int, *, target: str) -> str:
    """The ``Authorization`` header value for a request sent now to ``target``, the
    ``HOST:PORT`` the request is sent to (its Host header), in `target` form."""
    return f"{SCHEME} ts={now_ms},mac={mac(key, method, target, path, body, now_ms)}"


def key_id(key: bytes) -> str:
    """A name for a site key that gives nothing of it away: for logs and the audit."""
    return hashlib.sha256(key).hexdigest()[:8]


def authenticate(
    key: bytes,
    header: str | None,
    method: str,
    target: str,
    path: str,
    body: bytes,
    now_ms: int,
) -> Signed:
    """The header's form (and the target's: "" for a Host header that is missing or not
    HOST:PORT), then the MAC, then the clock; raise AuthError at the first failure.

    In an order that gives nothing away and costs an attacker most: a sender without the key
    learns nothing about clocks, names or replays, and cannot make us look anything up.
    """
    if not header:
        raise AuthError(
            "missing", f"no Authorization header; sign requests with the site key ({SCHEME})"
        )
    match = _HEADER.fullmatch(header.strip())
    if match is None:
        raise AuthError(
            "malformed", f"Authorization must read '{SCHEME} ts=<ms>,mac=<64 hex digits>'"
        )
    if not target:
        raise AuthError(
            "malformed", "the Host header must name the server as HOST:PORT, the address the "
            "request is sent to",
        )
    timestamp_ms, given = int(match["ts"]), match["mac"].lower()
    expected = mac(key, method, target, path, body, timestamp_ms)
    if not hmac.compare_digest(given.encode("ascii"), expected.encode("ascii")):
        raise AuthError(
            "bad_mac", "signature does not match: a different site key, an altered request "
            "(or Host header), or a client older than this server (update pvsctl)",
        )
    skew = timestamp_ms - now_ms
    if abs(skew) > MAX_SKEW_MS:
        raise AuthError(
            "stale", f"signed {skew / 1000:+.1f} s from this server's clock (limit "
            f"{MAX_SKEW_MS // 1000} s); check the clocks (NTP)",
        )
    return Signed(timestamp_ms, given, target)


def wrong_server(signed: Signed, here: str) -> AuthError:
    """The refusal of a request signed for another server (a replay, or a proxy between)."""
    return AuthError(
        "wrong_server", f"this request was signed for {signed.target}, and this server "
        f"({here}) is not it: a request is good only for the server it was sent to; send it "
        "to that address, or sign it for this one",
    )


def remember(signed: Signed, method: str, seen: ReplayCache, now_ms: int) -> None:
    """Refuse a mutating request accepted before (AuthError ``replayed``), else remember it."""
    if method.upper() in MUTATING_METHODS:
        seen.add(signed.mac, signed.timestamp_ms, now_ms)


def verify(
    key: bytes,
    header: str | None,
    method: str,
    target: str,
    path: str,
    body: bytes,
    now_ms: int,
    seen: ReplayCache,
    addressed_here: Callable[[str], bool],
) -> Signed:
    """Accept the request or raise AuthError saying why not: `authenticate`, then whether
    ``addressed_here(target)``, then `remember`."""
    signed = authenticate(key, header, method, target, path, body, now_ms)
    if not addressed_here(signed.target):
        raise wrong_server(signed, "this one")
    remember(signed, method, seen, now_ms)
    return signed


def names_this_server(
    signed_target: str, local: tuple[str, int], resolved: Collection[str] = ()
) -> bool:
    """Whether ``signed_target`` names the server whose socket ``local`` (IP, port) took the
    connection: the same port, and the same IP, written so or among the addresses
    ``resolved`` from the target's host name. A server on a wildcard address knows no better
    name for itself than the address each connection arrived on."""
    host, port = split_target(signed_target)
    if port != local[1]:
        return False
    here = _ip(local[0])
    if here is None:
        return False
    if _ip(host) == here:
        return True
    return any(_ip(address) == here for address in resolved)


def is_ip_literal(host: str) -> bool:
    return _ip(host) is not None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, IPv4-mapped IPv6 (a dual-stack socket's view of IPv4) taken as IPv4."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
