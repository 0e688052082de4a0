"""The files in deploy/ say what pvsd and systemd accept: the example site configures, and the
units verify. No root, no network."""

from __future__ import annotations

import secrets
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pvsd.config import format_address, from_mapping

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SITE = sorted((DEPLOY / "examples" / "site").glob("pvs*.toml"))


def test_the_example_site_is_three_servers_that_name_each_other(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_text(secrets.token_hex(32) + "\n")
    configs = []
    for path in SITE:
        values = tomllib.loads(path.read_text())
        assert values["key_file"] == "/etc/pvs/site.key"
        configs.append(from_mapping(values | {"key_file": str(key)}))
    assert [c.name for c in configs] == ["pvs1", "pvs2", "pvs3"]
    for config in configs:
        others = {c.listen for c in configs if c is not config}
        assert set(config.peers) == others, f"{config.name}: peers are not the other servers"
        assert config.admin == format_address(config.listen_host, config.listen_port + 1)
        assert config.stores and config.shared_stores
    assert len({c.subnets for c in configs}) == 2, "the example spans two subnets"


def test_the_target_example_logs_in_to_the_example_site() -> None:
    listens = {tomllib.loads(p.read_text())["listen"] for p in SITE}
    settings = {}
    for line in (DEPLOY / "examples" / "target" / "target-win10.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            settings[name] = shlex.split(value)[0]
    servers = shlex.split(settings["PVS_SERVERS"])
    assert servers[::2] == ["--server"] * 3 and set(servers[1::2]) == listens


@pytest.mark.parametrize("unit", ["pvsd.service", "pvs-target@.service"])
def test_the_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    true = shutil.which("true") or "/bin/true"  # the programs need not be installed here
    text = (DEPLOY / "systemd" / unit).read_text()
    for program in ("pvsd", "pvs-target"):
        text = text.replace(f"/opt/pvs/bin/{program} ", f"{true} ")
    (tmp_path / unit).write_text(text)
    instance = unit.replace("@.", "@win10.")
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / instance)], capture_output=True, text=True,
        timeout=60, check=False,
    )
    problems = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("unit", ["pvsd.service", "pvs-target@.service"])
def test_the_units_wait_for_readiness_and_watch_the_loop(unit: str) -> None:
    """Both programs speak sd_notify (pvsd.sd_notify): READY=1 once they serve, WATCHDOG=1
    from their event loop. NotifyAccess=main: only the main process may speak for them."""
    service: dict[str, str] = {}
    section = ""
    for line in (DEPLOY / "systemd" / unit).read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            service[name] = value
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"].endswith("s") and int(service["WatchdogSec"][:-1]) >= 10
    assert int(service["LimitNOFILE"]) >= 4096
