"""Running the real NBD clients from the external tests: skip when one is missing, fail with
its output when it fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from typing import Any

import pytest

STOP_TIMEOUT = 15.0


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


def end(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM a process this test started, and SIGKILL it if it does not exit in time."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)
