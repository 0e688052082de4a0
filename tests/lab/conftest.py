"""The lab tests: real servers and targets in network namespaces (deploy/lab.py).

They need root and ``ip netns``; without them they are skipped with the reason. Deselect them
with ``-m "not lab"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
if str(DEPLOY) not in sys.path:
    sys.path.insert(0, str(DEPLOY))  # deploy/lab.py is a script, importable as ``lab``


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab: builds a network lab in namespaces (root, ip netns); see docs/deploy.md"
    )
