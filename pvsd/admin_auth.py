"""Authenticating admin API requests with the site key, without I/O and without a clock.

Every request carries ``Authorization: PVS-HMAC ts=<ms>,mac=<hex>``, where ``mac`` is
HMAC-SHA256 under the site key of four lines::

    <ts>            milliseconds since the epoch, when the request was signed
    <METHOD>        upper case
    <path?query>    exactly as sent in the request line
    <sha256(body)>  hex; of the empty string for a request without a body

A request signed more than `MAX_SKEW_MS` from the receiver's clock is refused, so a captured
request stops working half a minute later. Within that window a captured GET could be sent
again and only reveals what the captured answer already showed; a captured POST could change
the site again, so the receiver remembers each POST's MAC until its timestamp falls out of the
window (`ReplayCache`) and refuses a second one.

The key authenticates; it does not encrypt. Run the admin API on a management network.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re

SCHEME = "PVS-HMAC"
MAX_SKEW_MS = 30_000
"""The same tolerance as the coordination channel: clocks of a site are kept by NTP."""
# The scheme is case-insensitive (RFC 9110, 11.1); the parameters are written as sign() does.
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_HEADER = re.compile(
    r"(?i:PVS-HMAC)\s+ts=(?P<ts>[0-9]{1,16})\s*,\s*mac=(?P<mac>[0-9a-fA-F]{64})\s*"
)


class AuthError(Exception):
    """A request was refused; ``reason`` is a short label counted in ``GET /v1/site``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


def canonical(method: str, path: str, body: bytes, timestamp_ms: int) -> bytes:
    """The text the MAC covers."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{timestamp_ms}\n{method.upper()}\n{path}\n{digest}".encode()


def mac(key: bytes, method: str, path: str, body: bytes, timestamp_ms: int) -> str:
    return hmac.new(key, canonical(method, path, body, timestamp_ms), hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, path: str, body: bytes, now_ms: int) -> str:
    """The ``Authorization`` header value for a request sent now."""
    return f"{SCHEME} ts={now_ms},mac={mac(key, method, path, body, now_ms)}"


def verify(
    key: bytes,
    header: str | None,
    method: str,
    path: str,
    body: bytes,
    now_ms: int,
    seen: ReplayCache,
) -> None:
    """Accept the request or raise AuthError saying why not.

    Checked in an order that gives nothing away and costs an attacker most: the header's
    form, then the MAC (so an unauthenticated sender learns nothing about clocks or replays
    and cannot fill the replay cache), then the time, then replay.
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
    timestamp_ms, given = int(match["ts"]), match["mac"].lower()
    expected = mac(key, method, path, body, timestamp_ms)
    if not hmac.compare_digest(given.encode("ascii"), expected.encode("ascii")):
        raise AuthError(
            "bad_mac", "signature does not match: a different site key, or an altered request"
        )
    skew = timestamp_ms - now_ms
    if abs(skew) > MAX_SKEW_MS:
        raise AuthError(
            "stale", f"signed {skew / 1000:+.1f} s from this server's clock (limit "
            f"{MAX_SKEW_MS // 1000} s); check the clocks (NTP)",
        )
    if method.upper() in MUTATING_METHODS:
        seen.add(given, timestamp_ms, now_ms)
