"""Admin API request signing: every field is covered (the server meant too), clocks are
bounded, POSTs count once; request bodies are strict JSON; the site's certificates work."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ssl
from pathlib import Path
from typing import Any

import pytest

from pvsd import audit, tls
from pvsd.admin_auth import (
    MAX_SKEW_MS,
    AuthError,
    ReplayCache,
    canonical,
    key_id,
    names_this_server,
    target,
    verify,
)
from pvsd.admin_auth import sign as sign_for
from pvsd.admin_common import ApiError, json_object, parse_json

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000_000
BODY = b'{"maintenance": true}'
PATH = "/v1/vdisks/win10/settings"
TARGET = "10.1.1.11:6911"


def sign(key: bytes, method: str, path: str, body: bytes, now: int) -> str:
    return sign_for(key, method, path, body, now, target=TARGET)


def here(signed_target: str) -> bool:
    return signed_target == TARGET


def accept(
    key: bytes, header: str | None, method: str, path: str, body: bytes, now: int,
    seen: ReplayCache,
) -> None:
    verify(key, header, method, TARGET, path, body, now, seen, here)


def refused(
    header: str | None,
    *,
    key: bytes = KEY,
    method: str = "POST",
    path: str = PATH,
    body: bytes = BODY,
    now: int = NOW,
    seen: ReplayCache | None = None,
    to: str = TARGET,
) -> str:
    """The reason verify gives for refusing; fails the test if it accepts."""
    with pytest.raises(AuthError) as caught:
        verify(key, header, method, to, path, body, now, seen or ReplayCache(), here)
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
        accept(KEY, header, method, path, body, NOW, ReplayCache())


def test_header_has_the_documented_form_and_mac() -> None:
    header = sign(KEY, "post", PATH, BODY, NOW)
    text = f"{NOW}\nPOST\n{TARGET}\n{PATH}\n{hashlib.sha256(BODY).hexdigest()}"
    assert canonical("post", TARGET, PATH, BODY, NOW) == text.encode()
    expected = hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()
    assert header == f"PVS-HMAC ts={NOW},mac={expected}"


def test_method_is_case_insensitive_and_mac_hex_case_too() -> None:
    header = sign(KEY, "POST", PATH, BODY, NOW)
    accept(KEY, header, "post", PATH, BODY, NOW, ReplayCache())
    prefix, mac = header.split(",mac=")
    ts = prefix.removeprefix("PVS-HMAC ")
    accept(KEY, f"PVS-HMAC  {ts} , mac={mac.upper()}", "POST", PATH, BODY, NOW, ReplayCache())
    accept(KEY, f"pvs-hmac {ts},mac={mac}", "POST", PATH, BODY, NOW, ReplayCache())


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("key", {"key": OTHER_KEY}),
        ("method", {"method": "GET"}),
        ("path", {"path": "/v1/vdisks/win11/settings"}),
        ("query", {"path": PATH + "?force=1"}),
        ("body", {"body": b'{"maintenance": false}'}),
        ("body emptied", {"body": b""}),
        ("server", {"to": "10.1.1.12:6911"}),
        ("port", {"to": "10.1.1.11:6912"}),
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
    accept(KEY, header, "GET", "/v1/servers", b"", NOW, ReplayCache())


def test_a_bad_mac_is_reported_before_the_clock() -> None:
    """An unauthenticated sender learns nothing about our clock."""
    header = sign(OTHER_KEY, "GET", "/v1/servers", b"", NOW - 10 * MAX_SKEW_MS)
    assert refused(header, method="GET", path="/v1/servers", body=b"") == "bad_mac"


def test_a_replayed_post_is_refused_within_the_window() -> None:
    seen = ReplayCache()
    header = sign(KEY, "POST", PATH, BODY, NOW)
    accept(KEY, header, "POST", PATH, BODY, NOW, seen)
    assert refused(header, now=NOW + 1, seen=seen) == "replayed"
    prefix, mac = header.split(",mac=")
    assert refused(f"{prefix},mac={mac.upper()}", now=NOW + 2, seen=seen) == "replayed"
    assert refused(header, now=NOW + MAX_SKEW_MS, seen=seen) == "replayed"
    # After the window the timestamp, not the cache, refuses it.
    assert refused(header, now=NOW + MAX_SKEW_MS + 1, seen=seen) == "stale"
    # A new signature of the same change is a new request.
    accept(KEY, sign(KEY, "POST", PATH, BODY, NOW + 1), "POST", PATH, BODY, NOW + 5, seen)


def test_gets_may_repeat() -> None:
    seen = ReplayCache()
    header = sign(KEY, "GET", "/v1/servers", b"", NOW)
    for offset in range(3):
        accept(KEY, header, "GET", "/v1/servers", b"", NOW + offset, seen)
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


# -- the server a request is meant for -------------------------------------------------------


def test_a_request_signed_for_another_server_is_refused_there_and_not_remembered() -> None:
    """The replay the site key alone allowed: captured on its way to one server, sent to
    another within the window. Each server has its own replay memory; the MAC covers the
    server, so only the one it was meant for takes it."""
    header = sign(KEY, "POST", PATH, BODY, NOW)
    elsewhere = ReplayCache()
    with pytest.raises(AuthError) as caught:
        verify(KEY, header, "POST", TARGET, PATH, BODY, NOW, elsewhere, lambda _target: False)
    assert caught.value.reason == "wrong_server" and TARGET in caught.value.detail
    assert len(elsewhere) == 0
    accept(KEY, header, "POST", PATH, BODY, NOW, ReplayCache())


@pytest.mark.parametrize(
    ("written", "default_port", "expected"),
    [
        ("10.1.1.11:6911", 80, "10.1.1.11:6911"),
        ("PVS1.Example.COM.:6911", 80, "pvs1.example.com:6911"),
        ("pvs1", 80, "pvs1:80"),
        ("pvs1", 443, "pvs1:443"),
        ("[::1]:6911", 80, "[::1]:6911"),
        ("[0:0::1]", 443, "[::1]:443"),
        ("[FE80::A]:1", 80, "[fe80::a]:1"),
        (" 10.1.1.11:6911 ", 80, "10.1.1.11:6911"),
    ],
)
def test_target_has_one_spelling(written: str, default_port: int, expected: str) -> None:
    assert target(written, default_port=default_port) == expected


@pytest.mark.parametrize(
    "written",
    ["", ":6911", "a:b", "a:0", "a:65536", "user@a:1", "a b:1", "[::1", "[zz::1]:1", "::1",
     "a/b:1", "a:1:2", "[::1]x", "é:1"],
)
def test_target_refuses_what_is_not_an_authority(written: str) -> None:
    with pytest.raises(ValueError):
        target(written, default_port=80)


@pytest.mark.parametrize(
    ("signed_for", "local", "resolved", "meant"),
    [
        ("10.1.1.11:6911", ("10.1.1.11", 6911), (), True),
        ("10.1.1.11:6911", ("10.1.1.12", 6911), (), False),  # replayed to another server
        ("10.1.1.11:6911", ("10.1.1.11", 6912), (), False),  # another server on one host
        ("10.1.1.11:6911", ("::ffff:10.1.1.11", 6911), (), True),  # dual-stack socket
        ("[::1]:6911", ("::1", 6911), (), True),
        ("[::1]:6911", ("127.0.0.1", 6911), (), False),
        ("pvs1:6911", ("10.1.1.11", 6911), ("10.1.1.11", "fd00::11"), True),
        ("pvs1:6911", ("10.1.1.11", 6911), ("10.1.1.12",), False),
        ("pvs1:6911", ("10.1.1.11", 6911), (), False),  # does not resolve
        ("pvs1:6911", ("10.1.1.11", 6912), ("10.1.1.11",), False),
    ],
)
def test_names_this_server(
    signed_for: str, local: tuple[str, int], resolved: tuple[str, ...], meant: bool
) -> None:
    assert names_this_server(signed_for, local, resolved) is meant


def test_key_id_names_the_key_without_giving_it_away() -> None:
    assert key_id(KEY) == hashlib.sha256(KEY).hexdigest()[:8]
    assert key_id(KEY) != key_id(OTHER_KEY)


# -- request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b'{"description": "\\ud800"}', "lone UTF-16 surrogate (\\ud800)"),
        (b'{"\\udfff": 1}', "surrogate (\\udfff)"),
        (b'{"to": ["s1", {"x": "a\\udbff"}]}', "surrogate (\\udbff)"),
        ('{"description": "\ud800"}'.encode("utf-8", "surrogatepass"), "surrogate"),
        (b'{"description": "\xff"}', "not JSON"),
        (b'{"rate": NaN}', "NaN is not a JSON number"),
        (b'{"rate": -Infinity}', "not a JSON number"),
        (b'{"rate": 1e999}', "too large"),
        (b"[" * 100_000, "nested too deeply"),
        (b"{", "not JSON"),
    ],
)
def test_a_body_no_handler_could_use_is_a_400(raw: bytes, said: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json(raw, example="{}")
    assert caught.value.status == 400
    assert said in caught.value.message and "send {}" in caught.value.message


def test_good_bodies_parse() -> None:
    assert parse_json(b"") is None and parse_json(b"  \n") is None
    assert parse_json('{"description": "Zoë 😀 \\u00e9 \\ud83d\\ude00"}'.encode()) == {
        "description": "Zoë 😀 é 😀"
    }
    assert json_object(b"", empty={}) == {}
    with pytest.raises(ApiError, match="must be a JSON object"):
        json_object(b"")
    with pytest.raises(ApiError, match="must be a JSON object"):
        json_object(b"[1]", empty={})


# -- the audit line ---------------------------------------------------------------------------


def test_settings_before_and_after_come_from_each_servers_result() -> None:
    results = [
        {"server": "s1", "ok": True, "properties_before": {"maintenance": False},
         "properties": {"maintenance": True}},
        {"server": "s2", "ok": False, "error": "down"},
    ]
    assert audit.settings_before_after(results) == {
        "before": {"s1": {"maintenance": False}}, "after": {"s1": {"maintenance": True}},
    }


# -- the site's certificates ------------------------------------------------------------------


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> str | None:
    """A TLS handshake in memory; the subject the server saw (None: no client certificate)."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    near = client.wrap_bio(client_in, client_out, server_hostname=name)
    far = server.wrap_bio(server_in, server_out, server_side=True)
    done = {id(near): False, id(far): False}
    for _ in range(20):
        for side in (near, far):
            if not done[id(side)]:
                try:
                    side.do_handshake()
                    done[id(side)] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    certificate = far.getpeercert()
    if not certificate:
        return None
    subject: Any = certificate["subject"]
    return ",".join(f"{k}={v}" for rdn in subject for k, v in rdn)


@pytest.fixture(scope="module")
def site_certs(tmp_path_factory: pytest.TempPathFactory) -> tls.Made:
    out = tmp_path_factory.mktemp("certs")
    return tls.make_site_certificates(
        out, {"s1": ["10.1.1.11", "pvs1.example.com"], "s2": ["10.1.1.12"]}, ["admin"]
    )


def test_servers_check_each_other_by_name_against_the_site_ca(site_certs: tls.Made) -> None:
    one = tls.AdminTls(*site_certs.servers["s1"], site_certs.ca)
    two = tls.AdminTls(*site_certs.servers["s2"], site_certs.ca)
    assert handshake(one.client_context(), two.server_context(), "s2") == "commonName=s1"
    assert site_certs.new_ca
    assert (site_certs.ca_key.stat().st_mode & 0o777) == 0o600
    assert all((key.stat().st_mode & 0o777) == 0o600 for _, key in site_certs.servers.values())


@pytest.mark.parametrize("name", ["s1", "10.1.1.11", "pvs1.example.com", "PVS1.example.com"])
def test_a_server_certificate_names_the_server_and_its_hosts(
    site_certs: tls.Made, name: str
) -> None:
    server = tls.server_context(*site_certs.servers["s1"], site_certs.ca)
    assert handshake(tls.client_context(site_certs.ca), server, name) is None


@pytest.mark.parametrize("name", ["s2", "10.1.1.12", "example.com"])
def test_a_certificate_for_another_name_is_refused(site_certs: tls.Made, name: str) -> None:
    server = tls.server_context(*site_certs.servers["s1"], site_certs.ca)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|not valid"):
        handshake(tls.client_context(site_certs.ca), server, name)


def test_a_certificate_of_another_ca_is_refused(
    site_certs: tls.Made, tmp_path: Path
) -> None:
    other = tls.make_site_certificates(tmp_path, {"s1": ["10.1.1.11"]})
    server = tls.server_context(*other.servers["s1"], other.ca)
    refused = r"self-signed certificate in certificate chain|unable to get local issuer"
    with pytest.raises(ssl.SSLCertVerificationError, match=refused):
        handshake(tls.client_context(site_certs.ca), server, "s1")
    # and a client certificate of another CA is refused by the server
    client = tls.client_context(site_certs.ca, *other.servers["s1"])
    server = tls.server_context(*site_certs.servers["s1"], site_certs.ca)
    with pytest.raises(ssl.SSLError):
        handshake(client, server, "s1")


def test_a_client_certificate_is_optional_and_named(site_certs: tls.Made) -> None:
    server = tls.server_context(*site_certs.servers["s1"], site_certs.ca)
    client = tls.client_context(site_certs.ca, *site_certs.clients["admin"])
    assert handshake(client, server, "s1") == "commonName=admin"


def test_a_server_added_later_gets_a_certificate_of_the_same_ca(site_certs: tls.Made) -> None:
    out = site_certs.ca.parent
    before = site_certs.ca.read_bytes()
    later = tls.make_site_certificates(out, {"s3": ["10.1.1.13"]})
    assert not later.new_ca and site_certs.ca.read_bytes() == before
    server = tls.server_context(*later.servers["s3"], later.ca)
    assert handshake(tls.client_context(site_certs.ca), server, "s3") is None
    with pytest.raises(tls.TlsError, match="exists"):
        tls.make_site_certificates(out, {"s3": ["10.1.1.13"]})


def test_unusable_files_are_named(site_certs: tls.Made, tmp_path: Path) -> None:
    cert, key = site_certs.servers["s1"]
    _, other_key = site_certs.servers["s2"]
    with pytest.raises(tls.TlsError, match="does not belong to certificate"):
        tls.server_context(cert, other_key, None)
    with pytest.raises(tls.TlsError, match="does not exist"):
        tls.server_context(tmp_path / "missing.pem", key, None)
    with pytest.raises(tls.TlsError, match=r"CA file .* does not exist"):
        tls.client_context(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match="is not PEM"):
        tls.server_context(garbage, key, None)
    with pytest.raises(tls.TlsError, match="holds no PEM certificate"):
        tls.client_context(garbage)
    (tmp_path / "ca.pem").write_bytes(site_certs.ca.read_bytes())
    with pytest.raises(tls.TlsError, match=r"ca\.key is missing"):
        tls.make_site_certificates(tmp_path, {"s9": ["10.1.1.19"]})


def test_tls_settings_go_together() -> None:
    @dataclasses.dataclass
    class Settings:
        admin_tls_cert: Path | None = None
        admin_tls_key: Path | None = None
        admin_tls_ca: Path | None = None

    assert tls.AdminTls.from_config(Settings()) is None
    with pytest.raises(tls.TlsError, match="admin_tls_key, admin_tls_ca missing"):
        tls.AdminTls.from_config(Settings(admin_tls_cert=Path("c.pem")))


def test_a_request_without_a_host_is_malformed_after_a_missing_header() -> None:
    assert refused(sign(KEY, "POST", PATH, BODY, NOW), to="") == "malformed"
    assert refused(None, to="") == "missing"
