"""pvsd's configuration, checked once at the edge: every refusal names where the value came
from (file and key, or flag), what was expected and what was found; what passes is the frozen
Config with the same defaults as before."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

from pvsd.config import KNOWN_SETTINGS, Config, ConfigError, from_mapping, load

MIB = 1024 * 1024


def write(tmp_path: Path, text: str) -> Path:
    """A config file with ``text``, plus a name, a store and no admin API unless it says."""
    path = tmp_path / "pvsd.toml"
    head = {"name": '"t1"', "admin": '"off"', "stores": f'["{tmp_path}"]'}
    lines = [f"{key} = {value}" for key, value in head.items() if f"{key} =" not in text]
    path.write_text("\n".join([*lines, text]) + "\n")
    return path


def refusal(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(argv)
    message = str(caught.value)
    assert "\n" not in message, "one line"
    return message


@pytest.mark.parametrize(
    ("line", "key", "expected", "found"),
    [
        ('power = "high"', "power", "a number from 0.1 to 1000", 'the string "high"'),
        ('peer_timeout = "3"', "peer_timeout", "a positive number of seconds", 'the string "3"'),
        ('drain_timeout = "10"', "drain_timeout", "positive number", 'the string "10"'),
        ("name = 5", "name", "a server name", "the number 5"),
        ('log_level = "verbose"', "log_level", '"debug", "info"', 'the string "verbose"'),
        ('peers = "a:1"', "peers", 'a list of "HOST:PORT" strings', 'the string "a:1"'),
        ("peers = [5]", "peers", 'a list of "HOST:PORT" strings', "the list [5]"),
        ('stores = "/path"', "stores", "a list of directories", 'the string "/path"'),
        ("listen = 9940", "listen", '"HOST:PORT"', "the number 9940"),
        ('log_json = "yes"', "log_json", "true or false", 'the string "yes"'),
        ("power = true", "power", "a number", "true"),
        ("max_in_flight = 1.5", "max_in_flight", "a whole number", "the number 1.5"),
        ("metrics = 1", "metrics", "true or false", "the number 1"),
        ("power = 5000", "power", "from 0.1 to 1000", "the number 5000"),
        ("peer_timeout = 0", "peer_timeout", "positive", "the number 0"),
        ("power = inf", "power", "a number", "the number inf"),
        ("max_connections_per_source = 0", "max_connections_per_source", "from 1", "the number 0"),
        ("boot_listen = 6912", "boot_listen", "for network boot (plain HTTP)", "the number 6912"),
    ],
)
def test_a_wrong_type_or_range_names_file_key_expected_and_found(
    tmp_path: Path, line: str, key: str, expected: str, found: str
) -> None:
    path = write(tmp_path, line)
    message = refusal(["--config", str(path)])
    assert message.startswith(f"{path}: {key}: expected "), message
    assert expected in message and f"found {found}" in message, message


def test_internal_fields_and_unknown_keys_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    for key in ("site_key", "listen_host", "admin_port", "colour"):
        path = write(tmp_path, f'{key} = "x"')
        message = refusal(["--config", str(path)])
        assert message.startswith(f"{path}: {key}: unknown setting; known settings: "), message
        assert "peer_timeout" in message and "reply_budget" in message
        assert "site_key" not in KNOWN_SETTINGS


def test_every_refused_setting_is_named_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'power = "high"\nlog_json = "yes"')
    message = refusal(["--config", str(path)])
    assert f"{path}: power:" in message and f"{path}: log_json:" in message


def test_a_flag_wins_over_the_file_and_is_named_when_wrong(tmp_path: Path) -> None:
    path = write(tmp_path, "power = 2.0\npeer_timeout = 4")
    config = load(["--config", str(path), "--power", "3"])
    assert config.power == 3.0 and config.peer_timeout == 4.0
    message = refusal(["--config", str(path), "--power", "5000"])
    assert message.startswith("--power: expected a number from 0.1 to 1000"), message
    message = refusal(["--config", str(path), "--peer", "a:b"])
    assert message.startswith("--peer: ") and "'b' is not a number" in message, message
    message = refusal(["--config", str(path), "--reply-budget", "lots"])
    assert message.startswith("--reply-budget: ") and "'lots'" in message, message


def test_bad_values_inside_the_right_type_say_why(tmp_path: Path) -> None:
    cases = {
        'listen = "a:b"': "port 'b' is not a number",
        'peers = ["10.0.0.1:99999"]': "99999",
        'subnets = ["x"]': "'x' is not a network",
        'name = "a/b"': "server name 'a/b' has a character that is not allowed",
        'reply_budget = "12Q"': "'12Q' is not understood",
        "reply_budget = 5": "less than 1 MiB",
    }
    for line, said in cases.items():
        path = write(tmp_path, line)
        message = refusal(["--config", str(path)])
        key = line.split(" ")[0]
        assert message.startswith(f"{path}: {key}: ") and said in message, message


def test_server_names_follow_the_vdisk_name_rules() -> None:
    for name in ("s1", "pvs-1.site_a", "A" * 64):
        assert from_mapping({"name": name, "stores": ["/s"]}).name == name
    for name in ("", "../x", "a b", "-x", "A" * 65, "x\n", "é"):
        with pytest.raises(ConfigError, match="name"):
            from_mapping({"name": name, "stores": ["/s"]})


def test_defaults_are_the_config_defaults() -> None:
    config = from_mapping({"name": "s1", "stores": ["/s"]})
    for field in dataclasses.fields(Config):
        if field.name in ("name", "stores", "background_threads"):
            continue
        assert getattr(config, field.name) == field.default, field.name
    assert config.listen == "0.0.0.0:6910" and config.admin == ""
    assert config.reply_budget == 256 * MIB and config.metrics is True
    assert config.max_connections_per_source == 64 and config.admin_tls_cert is None


def test_new_settings_from_file_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path, 'reply_budget = "512M"\nmax_connections_per_source = 8\nmetrics = false')
    config = load(["--config", str(path)])
    assert (config.reply_budget, config.max_connections_per_source, config.metrics) == (
        512 * MIB, 8, False,
    )
    config = load(["--config", str(path), "--reply-budget", "1G", "--metrics", "on",
                   "--max-connections-per-source", "100"])
    assert (config.reply_budget, config.max_connections_per_source, config.metrics) == (
        1 << 30, 100, True,
    )
    assert from_mapping({"name": "a", "stores": ["/s"], "reply_budget": 8 * MIB}).reply_budget == (
        8 * MIB
    )
    with pytest.raises(ConfigError, match=r"reply_budget: .*less than max_request"):
        from_mapping({"name": "a", "stores": ["/s"], "reply_budget": "2M",
                      "max_request": 4 * MIB})


def test_admin_tls_needs_all_three_readable_files(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_text(secrets.token_hex(32))
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    for file in files.values():
        file.write_text("-----BEGIN X-----\n")
    base = {"name": "a", "stores": ["/s"], "key_file": str(key), "listen": "127.0.0.1:7000"}
    tls = {f"admin_tls_{name}": str(path) for name, path in files.items()}
    config = from_mapping(base | tls)
    assert config.admin_tls_cert == files["cert"] and config.admin_tls_ca == files["ca"]
    assert config.admin == "127.0.0.1:7001"
    with pytest.raises(ConfigError, match="admin_tls_key, admin_tls_ca missing"):
        from_mapping(base | {"admin_tls_cert": str(files["cert"])})
    missing = tls | {"admin_tls_ca": str(tmp_path / "absent.pem")}
    with pytest.raises(ConfigError, match=r"admin_tls_ca: cannot read .*absent.pem"):
        from_mapping(base | missing)
    with pytest.raises(ConfigError, match="admin API is off"):
        from_mapping(base | tls | {"admin": "off"})
    config = load(["--name", "a", "--store", "/s", "--key-file", str(key),
                   "--listen", "127.0.0.1:7000", "--admin-tls-cert", str(files["cert"]),
                   "--admin-tls-key", str(files["key"]), "--admin-tls-ca", str(files["ca"])])
    assert config.admin_tls_key == files["key"]


def test_the_checks_between_settings_stay(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_text(secrets.token_hex(32))
    cases: list[tuple[dict[str, object], str]] = [
        ({}, "no vDisk store"),
        ({"stores": ["/s"], "peers": ["10.0.0.2:6910"]}, "no site key"),
        ({"stores": ["/s"], "admin": "127.0.0.1:7001"}, "needs the site key"),
        ({"stores": ["/s"], "peers": ["10.0.0.2:6910"], "key_file": str(key)}, "--advertise"),
        ({"stores": ["/s"], "subnets": ["10.0.0.0/24"] * 9}, "at most 8 networks"),
        ({"stores": ["/s"], "key_file": str(tmp_path / "none")}, "key file"),
    ]
    for values, said in cases:
        with pytest.raises(ConfigError, match=said):
            from_mapping({"name": "a"} | values)


def test_the_file_itself_must_be_readable_toml(tmp_path: Path) -> None:
    assert "No such file" in refusal(["--config", str(tmp_path / "absent.toml")])
    path = tmp_path / "bad.toml"
    path.write_text("power = \n")
    assert "not valid TOML" in refusal(["--config", str(path)])


def test_boot_listen_is_an_address_of_its_own(tmp_path: Path) -> None:
    base: dict[str, object] = {"name": "a", "stores": ["/s"], "listen": "127.0.0.1:7000"}
    assert from_mapping(base).boot_listen == ""
    assert from_mapping(base | {"boot_listen": "off"}).boot_listen == ""
    config = from_mapping(base | {"boot_listen": "10.0.0.5"})
    assert (config.boot_host, config.boot_port) == ("10.0.0.5", 6912)
    assert from_mapping(base | {"boot_listen": ":8080"}).boot_listen == "0.0.0.0:8080"
    assert from_mapping(base | {"boot_listen": "[fd00::5]:80"}).boot_listen == "[fd00::5]:80"
    path = write(tmp_path, 'boot_listen = "10.0.0.5:http"')
    message = refusal(["--config", str(path)])
    assert message.startswith(f"{path}: boot_listen: address '10.0.0.5:http': port"), message
    message = refusal(["--name", "a", "--store", "/s", "--admin", "off",
                       "--boot-listen", "bad host:1"])
    assert message.startswith("--boot-listen: address 'bad host:1'"), message
    for clash in ("127.0.0.1:7000", "0.0.0.0:7000"):
        with pytest.raises(ConfigError, match=r"boot_listen: .* takes the port of listen"):
            from_mapping(base | {"boot_listen": clash})
    config = load(["--name", "a", "--store", "/s", "--admin", "off",
                   "--boot-listen", "127.0.0.2:6912"])
    assert config.boot_listen == "127.0.0.2:6912"
