"""Admin API request signing: every field is covered, clocks are bounded, POSTs count once."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from pvsd.admin_auth import (
    MAX_SKEW_MS,
    AuthError,
    ReplayCache,
    canonical,
    sign,
    verify,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000_000
BODY = b'{"maintenance": true}'
PATH = "/v1/vdisks/win10/settings"


def refused(
    header: str | None,
    *,
    key: bytes = KEY,
    method: str = "POST",
    path: str = PATH,
    body: bytes = BODY,
    now: int = NOW,
    seen: ReplayCache | None = None,
) -> str:
    """The reason verify gives for refusing; fails the test if it accepts."""
    with pytest.raises(AuthError) as caught:
        verify(key, header, method, path, body, now, seen or ReplayCache())
    assert str(caught.value).startswith(caught.value.reason)
    return caught.value.reason


def test_round_trip_for_each_method() -> None:
    for method, path, body in (
        ("GET", "/v1/servers", b""),
        ("POST", PATH, BODY),
        ("POST", "/v1/servers/s2/stop-stream", b""),
        ("GET", "/v1/targets?server=s1&x=%20", b""),
    ):
        header = sign(KEY, method, path, body, NOW)
        verify(KEY, header, method, path, body, NOW, ReplayCache())


def test_header_has_the_documented_form_and_mac() -> None:
    header = sign(KEY, "post", PATH, BODY, NOW)
    text = f"{NOW}\nPOST\n{PATH}\n{hashlib.sha256(BODY).hexdigest()}"
    assert canonical("post", PATH, BODY, NOW) == text.encode()
    expected = hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()
    assert header == f"PVS-HMAC ts={NOW},mac={expected}"


def test_method_is_case_insensitive_and_mac_hex_case_too() -> None:
    header = sign(KEY, "POST", PATH, BODY, NOW)
    verify(KEY, header, "post", PATH, BODY, NOW, ReplayCache())
    prefix, mac = header.split(",mac=")
    ts = prefix.removeprefix("PVS-HMAC ")
    verify(KEY, f"PVS-HMAC  {ts} , mac={mac.upper()}", "POST", PATH, BODY, NOW, ReplayCache())
    verify(KEY, f"pvs-hmac {ts},mac={mac}", "POST", PATH, BODY, NOW, ReplayCache())


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("key", {"key": OTHER_KEY}),
        ("method", {"method": "GET"}),
        ("path", {"path": "/v1/vdisks/win11/settings"}),
        ("query", {"path": PATH + "?force=1"}),
        ("body", {"body": b'{"maintenance": false}'}),
        ("body emptied", {"body": b""}),
    ],
)
def test_tampering_with_any_field_breaks_the_mac(field: str, changes: dict[str, object]) -> None:
    header = sign(KEY, "POST", PATH, BODY, NOW)
    assert refused(header, **changes) == "bad_mac", field  # type: ignore[arg-type]


def test_tampering_with_the_timestamp_breaks_the_mac() -> None:
    header = sign(KEY, "POST", PATH, BODY, NOW)
    assert refused(header.replace(f"ts={NOW}", f"ts={NOW + 1}")) == "bad_mac"


def test_tampering_with_the_mac_breaks_it() -> None:
    header = sign(KEY, "POST", PATH, BODY, NOW)
    last = header[-1]
    flipped = header[:-1] + ("0" if last != "0" else "1")
    assert refused(flipped) == "bad_mac"


@pytest.mark.parametrize("header", ["", None])
def test_missing_header(header: str | None) -> None:
    assert refused(header) == "missing"


@pytest.mark.parametrize(
    "header",
    [
        "Bearer abc",
        "PVS-HMAC",
        f"PVS-HMAC ts={NOW}",
        "PVS-HMAC mac=" + "0" * 64,
        f"PVS-HMAC ts={NOW},mac=" + "0" * 63,
        f"PVS-HMAC ts={NOW},mac=" + "0" * 65,
        f"PVS-HMAC ts={NOW},mac=" + "g" * 64,
        "PVS-HMAC ts=-5,mac=" + "0" * 64,
        "PVS-HMAC ts=12345678901234567890,mac=" + "0" * 64,
        f"PVS-HMAC mac={'0' * 64},ts={NOW}",
        f"PVS-HMAC ts={NOW},mac={'0' * 64},extra=1",
        f"PVS-HMAC TS={NOW},MAC={'0' * 64}",
    ],
)
def test_malformed_headers(header: str) -> None:
    assert refused(header) == "malformed"


@pytest.mark.parametrize("skew", [-MAX_SKEW_MS - 1, MAX_SKEW_MS + 1, -3_600_000, 86_400_000])
def test_timestamps_outside_the_window_are_stale(skew: int) -> None:
    header = sign(KEY, "GET", "/v1/servers", b"", NOW + skew)
    assert refused(header, method="GET", path="/v1/servers", body=b"") == "stale"


@pytest.mark.parametrize("skew", [-MAX_SKEW_MS, -29_000, 0, 29_000, MAX_SKEW_MS])
def test_timestamps_inside_the_window_pass(skew: int) -> None:
    header = sign(KEY, "GET", "/v1/servers", b"", NOW + skew)
    verify(KEY, header, "GET", "/v1/servers", b"", NOW, ReplayCache())


def test_a_bad_mac_is_reported_before_the_clock() -> None:
    """An unauthenticated sender learns nothing about our clock."""
    header = sign(OTHER_KEY, "GET", "/v1/servers", b"", NOW - 10 * MAX_SKEW_MS)
    assert refused(header, method="GET", path="/v1/servers", body=b"") == "bad_mac"


def test_a_replayed_post_is_refused_within_the_window() -> None:
    seen = ReplayCache()
    header = sign(KEY, "POST", PATH, BODY, NOW)
    verify(KEY, header, "POST", PATH, BODY, NOW, seen)
    assert refused(header, now=NOW + 1, seen=seen) == "replayed"
    prefix, mac = header.split(",mac=")
    assert refused(f"{prefix},mac={mac.upper()}", now=NOW + 2, seen=seen) == "replayed"
    assert refused(header, now=NOW + MAX_SKEW_MS, seen=seen) == "replayed"
    # After the window the timestamp, not the cache, refuses it.
    assert refused(header, now=NOW + MAX_SKEW_MS + 1, seen=seen) == "stale"
    # A new signature of the same change is a new request.
    verify(KEY, sign(KEY, "POST", PATH, BODY, NOW + 1), "POST", PATH, BODY, NOW + 5, seen)


def test_gets_may_repeat() -> None:
    seen = ReplayCache()
    header = sign(KEY, "GET", "/v1/servers", b"", NOW)
    for offset in range(3):
        verify(KEY, header, "GET", "/v1/servers", b"", NOW + offset, seen)
    assert len(seen) == 0


def test_a_refused_request_is_not_remembered() -> None:
    seen = ReplayCache()
    refused(sign(OTHER_KEY, "POST", PATH, BODY, NOW), seen=seen)
    refused(sign(KEY, "POST", PATH, BODY, NOW - 2 * MAX_SKEW_MS), seen=seen)
    assert len(seen) == 0


def test_the_replay_cache_forgets_expired_entries_and_stays_bounded() -> None:
    seen = ReplayCache(capacity=3)
    for index in range(3):
        seen.add(f"mac{index}", NOW, NOW)
    with pytest.raises(AuthError) as caught:
        seen.add("mac3", NOW, NOW + 1)
    assert caught.value.reason == "busy"
    assert len(seen) == 3
    seen.add("mac3", NOW + MAX_SKEW_MS + 1, NOW + MAX_SKEW_MS + 1)  # the first three expired
    assert len(seen) == 1
    with pytest.raises(AuthError):
        seen.add("mac3", NOW + MAX_SKEW_MS + 1, NOW + MAX_SKEW_MS + 2)


def test_entries_expire_by_their_own_timestamp() -> None:
    """A request signed in the future is kept until its own timestamp leaves the window."""
    seen = ReplayCache()
    seen.add("early", NOW - MAX_SKEW_MS, NOW)
    seen.add("late", NOW + MAX_SKEW_MS, NOW)
    seen.add("other", NOW, NOW + 1)
    assert len(seen) == 2  # "early" expired at NOW + 1
    seen.add("again", NOW + 2 * MAX_SKEW_MS, NOW + 2 * MAX_SKEW_MS)
    assert len(seen) == 2  # "late" (expires NOW + 2*MAX_SKEW_MS) is kept, "other" went
    with pytest.raises(AuthError):
        seen.add("late", NOW + MAX_SKEW_MS, NOW + 2 * MAX_SKEW_MS)
