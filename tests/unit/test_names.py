from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvsd.names import InvalidName, is_valid_name, validate_name


@pytest.mark.parametrize("name", ["a", "win10", "Win10-LTSC_2021.v2", "0", "x" * 64, "a.b-c_d"])
def test_accepts_safe_names(name: str) -> None:
    assert validate_name(name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters"),
        (".hidden", "not allowed"),
        ("-flag", "not allowed"),
        ("_x", "not allowed"),
        ("a/b", "not allowed"),
        ("a b", "not allowed"),
        ("a\n", "not allowed"),
        ("a\x00", "not allowed"),
        ("disk\u00e9", "not allowed"),
        ("a..b", "'..'"),
        ("a..", "'..'"),
    ],
)
def test_refuses_unsafe_names_and_says_why(name: str, said: str) -> None:
    with pytest.raises(InvalidName, match="letters, digits") as raised:
        validate_name(name)
    assert said in str(raised.value)
    assert not is_valid_name(name)


@given(st.text(max_size=80))
def test_every_accepted_name_is_a_plain_file_name(name: str) -> None:
    if is_valid_name(name):
        assert 1 <= len(name) <= 64
        assert "/" not in name and "\x00" not in name and ".." not in name
        assert name[0].isascii() and name[0].isalnum()
        assert name.isascii() and name.isprintable()
