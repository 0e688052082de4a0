"""Fixtures for integration tests: pvsd processes that are always stopped, whatever happens.

pytest puts this directory on ``sys.path`` (rootdir-relative, no ``__init__.py``, like
tests/unit), so test modules import the helpers as ``import harness``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Servers


@pytest.fixture
def pvsd_factory(tmp_path: Path) -> Iterator[Servers]:
    """``pvsd_factory(name, stores, vdisks=[...], args=[...])`` -> a started `Pvsd`; every
    server it made is stopped after the test, passed or failed."""
    (tmp_path / "store").mkdir(exist_ok=True)
    servers = Servers(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Like ``pvsd_factory`` for servers shared by the tests of one module."""
    workdir = tmp_path_factory.mktemp("servers")
    (workdir / "store").mkdir(exist_ok=True)
    servers = Servers(workdir)
    try:
        yield servers
    finally:
        servers.stop_all()
