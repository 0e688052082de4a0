"""Running the real NBD clients from the external tests: skip when one is missing, fail with
its output when it fails."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def need(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(*command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n" \
        f"{result.stdout}\n{result.stderr}"
    return result
