"""The real pvsd refuses a bad configuration the way an administrator needs: one line on
stderr naming the file, the key, what was expected and what was found, exit code 2, and
nothing listening (each case gets an address of its own, checked free afterwards)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from harness import PYTHON, free_port, loopback_host

CASES = {
    "power": ('power = "high"', 'expected a number from 0.1 to 1000, found the string "high"'),
    "peer_timeout": ('peer_timeout = "3"', 'found the string "3"'),
    "name": ("name = 5", "found the number 5"),
    "log_level": ('log_level = "verbose"', 'found the string "verbose"'),
    "peers": ('peers = "a:1"', 'found the string "a:1"'),
    "stores": ('stores = "/path"', 'found the string "/path"'),
    "listen": ("listen = 9940", "found the number 9940"),
    "log_json": ('log_json = "yes"', 'expected true or false, found the string "yes"'),
    "site_key": ('site_key = "00"', "unknown setting; known settings: "),
    "reply_budget": ('reply_budget = "lots"', "'lots' is not understood"),
    "boot_listen": ('boot_listen = "10.0.0.5:boot"', "port 'boot' is not a number"),
}


def test_each_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    runs = {}
    for key, (line, _said) in CASES.items():
        host = loopback_host()
        port = free_port(host)
        config = tmp_path / f"{key}.toml"
        defaults = {
            "name": '"c1"', "stores": f'["{tmp_path}"]', "listen": f'"{host}:{port}"',
            "admin": '"off"',
        }
        lines = [f"{k} = {v}" for k, v in defaults.items() if not line.startswith(f"{k} =")]
        config.write_text("\n".join([*lines, line]) + "\n")
        runs[key] = (config, host, port, subprocess.Popen(
            [PYTHON, "-m", "pvsd", "--config", str(config)], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ))
    for key, (config, host, port, process) in runs.items():
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
        lines = stderr.splitlines()
        assert process.returncode == 2, (key, process.returncode, stderr)
        assert len(lines) == 1 and not stdout, (key, stderr)
        assert lines[0].startswith(f"pvsd: {config}: {key}: "), lines[0]
        assert CASES[key][1] in lines[0], lines[0]
        assert "Traceback" not in stderr
        assert _free(host, port), f"{key}: something still listens on {host}:{port}"


def test_a_bad_flag_names_the_flag(tmp_path: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "pvsd", "--name", "c1", "--store", str(tmp_path), "--admin", "off",
         "--peer", "10.0.0.1:x"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pvsd: --peer: ") and "'x' is not a number" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
