from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvsd.names import InvalidName, is_valid_name, validate_device_id, validate_name


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


@pytest.mark.parametrize(
    "device", ["52-54-00-12-34-56", "lab-7", "admin-pc", "a", "x" * 128, "host.example:eth0"]
)
def test_accepts_device_ids_safe_on_a_kernel_command_line(device: str) -> None:
    assert validate_device_id(device) == device


@given(st.text(max_size=140))
def test_every_accepted_device_id_is_one_plain_word(device: str) -> None:
    try:
        validate_device_id(device)
    except InvalidName as error:
        assert "is not a device id" in str(error)
        return
    assert 1 <= len(device) <= 128 and device.isascii() and device.isprintable()
    assert not any(c in device for c in " \t\"'$\\/&|#=")
