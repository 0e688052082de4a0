from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvs_protocol.modes import Mode, SubnetAffinity
from pvsd.properties import (
    PropertiesError,
    VDiskProperties,
    dump_properties,
    load_properties,
    properties_path,
    save_properties,
)


def test_properties_file_sits_beside_the_image() -> None:
    assert properties_path(Path("/store/win10.img")) == Path("/store/win10.vdisk.toml")


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    properties = load_properties(tmp_path / "absent.vdisk.toml")
    assert properties == VDiskProperties()
    assert properties.mode is Mode.standard
    assert properties.version == 1
    assert properties.load_balancing and properties.block_size == 4096


def test_save_then_load_gives_the_same_properties(tmp_path: Path) -> None:
    path = tmp_path / "a.vdisk.toml"
    properties = VDiskProperties(
        mode=Mode.private,
        maintenance=True,
        version=7,
        description='say "hi"\\ \n\ttab é',
        load_balancing=False,
        fixed_server="pvs-2",
        subnet_affinity=SubnetAffinity.best_effort,
        block_size=512,
    )
    save_properties(path, properties)
    assert load_properties(path) == properties
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.vdisk.toml"]  # no temporary left


def test_written_file_explains_every_key() -> None:
    text = dump_properties(VDiskProperties())
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for key in VDiskProperties().to_mapping():
        assert f"# {key}:" in comments
    assert tomllib.loads(text) == VDiskProperties().to_mapping()


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
def test_any_description_survives_the_writer(description: str) -> None:
    properties = VDiskProperties(description=description)
    assert VDiskProperties.from_mapping(tomllib.loads(dump_properties(properties))) == properties


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('mode = "shared"', "mode", '"standard" or "private"'),
        ("mode = 1", "mode", '"standard" or "private"'),
        ("maintenance = 1", "maintenance", "true or false"),
        ("version = true", "version", "a whole number"),
        ('version = "2"', "version", "a whole number"),
        ("version = -1", "version", "use 0 to"),
        ("version = 4294967296", "version", "use 0 to"),
        ("description = 5", "description", "quotes"),
        ('subnet_affinity = "nearby"', "subnet_affinity", '"best_effort"'),
        ("block_size = 1000", "block_size", "power of two"),
        ("block_size = 256", "block_size", "power of two"),
        ("block_size = 131072", "block_size", "power of two"),
        ("load_balancing = false", "fixed_server", "name the serving server"),
        ('fixed_server = " pvs1"', "fixed_server", "bare name"),
        ("versoin = 2", "versoin", "fix its spelling"),
        ("version = ", "(syntax)", "fix the TOML syntax"),
    ],
)
def test_bad_values_name_file_key_and_fix(tmp_path: Path, text: str, key: str, hint: str) -> None:
    path = tmp_path / "bad.vdisk.toml"
    path.write_text(text + "\n")
    with pytest.raises(PropertiesError) as raised:
        load_properties(path)
    message = str(raised.value)
    assert raised.value.key == key
    assert message.startswith(f"{path}: {key}: ")
    assert hint in message


def test_unreadable_properties_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dir.vdisk.toml"
    path.mkdir()
    with pytest.raises(PropertiesError, match="cannot be read"):
        load_properties(path)


def test_fixed_server_without_load_balancing_is_fine() -> None:
    properties = VDiskProperties(load_balancing=False, fixed_server="pvs1")
    assert properties.fixed_server == "pvs1"


@pytest.mark.parametrize(("mode", "code"), [(Mode.standard, 1), (Mode.private, 2)])
def test_mode_wire_codes_are_stable(mode: Mode, code: int) -> None:
    assert mode.code == code
    assert Mode.from_code(code) is mode


@pytest.mark.parametrize(
    ("affinity", "code"),
    [(SubnetAffinity.none, 0), (SubnetAffinity.best_effort, 1), (SubnetAffinity.fixed, 2)],
)
def test_affinity_wire_codes_are_stable(affinity: SubnetAffinity, code: int) -> None:
    assert affinity.code == code
    assert SubnetAffinity.from_code(code) is affinity


def test_unknown_codes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown Mode code 0"):
        Mode.from_code(0)
    with pytest.raises(ValueError, match="unknown SubnetAffinity code 3"):
        SubnetAffinity.from_code(3)
