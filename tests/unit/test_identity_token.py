"""The identity token (``pvs.identity=`` on a kernel command line, ``pvs-target attach --pin``):
every identity a login can carry goes through it unchanged, and every word that is not one is
refused with a message saying what is wrong, before anything is sent to a server."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity

DIGEST = "ab" * DIGEST_SIZE
GOOD = f"3-1764628000123456789-1073741824-16384-{DIGEST}"

identities = st.builds(
    ReplicaIdentity,
    version=st.integers(0, 2**32 - 1),
    timestamp_ns=st.integers(0, 2**64 - 1),
    size=st.integers(0, 2**64 - 1),
    digest=st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE),
    block_size=st.integers(1, 2**32 - 1),
)


@given(identities)
def test_a_token_gives_back_the_identity(identity: ReplicaIdentity) -> None:
    token = identity.token()
    assert ReplicaIdentity.from_token(token) == identity
    assert token.isascii() and token.isprintable() and " " not in token  # one kernel argument


def test_the_documented_form() -> None:
    identity = ReplicaIdentity.from_token(GOOD)
    assert identity == ReplicaIdentity(3, 1764628000123456789, 1073741824, b"\xab" * 32, 16384)
    assert identity.token() == GOOD


@pytest.mark.parametrize(
    ("token", "said"),
    [
        ("", "not an identity token"),
        ("garbage", "not an identity token"),
        ("3-1764628000123456789-1073741824-16384", "not an identity token"),  # four parts
        (f"{GOOD}-7", "not an identity token"),  # six parts
        (f"3--1073741824-16384-{DIGEST}", "not an identity token"),  # an empty number
        (f"x-1-2-3-{DIGEST}", "not an identity token"),
        (f"3-1.5-2-3-{DIGEST}", "not an identity token"),
        (f"+3-1-2-3-{DIGEST}", "not an identity token"),
        (f" 3-1-2-3-{DIGEST}", "not an identity token"),
        (f"3_0-1-2-3-{DIGEST}", "not an identity token"),
        (f"\u0663-1-2-3-{DIGEST}", "not an identity token"),  # Arabic-Indic three
        (f"3-\u0661-2-3-{DIGEST}", "not an identity token"),  # Arabic-Indic one
        (f"\u00b2-1-2-3-{DIGEST}", "not an identity token"),  # superscript two
        (f"-3-1-2-3-{DIGEST}", "not an identity token"),  # negative version
        (f"3-1-2--3-{DIGEST}", "not an identity token"),  # negative block size
        (f"4294967296-1-2-3-{DIGEST}", "version is above 4294967295"),
        (f"3-18446744073709551616-2-3-{DIGEST}", "timestamp is above 18446744073709551615"),
        (f"3-1-18446744073709551616-3-{DIGEST}", "size is above 18446744073709551615"),
        (f"3-1-2-4294967296-{DIGEST}", "block size is above 4294967295"),
        ("9" * 5000 + f"-1-2-3-{DIGEST}", "version is above 4294967295"),
        (f"3-1-2-0-{DIGEST}", "must not be negative"),  # block size 0
        ("3-1-2-3-" + "zz" * DIGEST_SIZE, "not 64 hexadecimal digits"),
        ("3-1-2-3-" + "ab" * (DIGEST_SIZE - 1), "not 64 hexadecimal digits"),  # short
        ("3-1-2-3-" + "ab" * (DIGEST_SIZE + 1), "not 64 hexadecimal digits"),  # long
        ("3-1-2-3-" + "a" * 63, "not 64 hexadecimal digits"),  # odd
        ("3-1-2-3-", "not 64 hexadecimal digits"),
        ("3-1-2-3-" + " ".join(["ab"] * DIGEST_SIZE), "not 64 hexadecimal digits"),
        (f"{GOOD}\n", "not 64 hexadecimal digits"),
        ("3-1-2-3-" + "\u0661" * 64, "not 64 hexadecimal digits"),
    ],
)
def test_a_malformed_token_is_refused_with_the_reason(token: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        ReplicaIdentity.from_token(token)


@given(st.text(max_size=120))
def test_any_text_is_an_identity_or_a_value_error(text: str) -> None:
    try:
        identity = ReplicaIdentity.from_token(text)
    except ValueError as error:
        assert str(error)
    else:
        assert ReplicaIdentity.from_token(identity.token()) == identity


def test_the_real_command_refuses_a_bad_pin_as_a_usage_error() -> None:
    """Before connecting anywhere: the server given is a port nothing listens on."""
    result = subprocess.run(
        [sys.executable, "-m", "pvs_target", "attach", "--server", "127.0.0.1:1",
         "--vdisk", "disk", "--pin", "garbage"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last == (
        "pvs-target attach: error: argument --pin: not an identity token "
        "(VERSION-TIMESTAMPNS-SIZE-BLOCKSIZE-DIGEST): 'garbage'"
    ), result.stderr
    assert result.stderr.startswith("usage: pvs-target attach"), result.stderr
