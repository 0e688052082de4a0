"""The installed pvs version, for every program's ``--version`` and the admin API's answers.

Read from the installed distribution's metadata (pyproject.toml's ``version``), so that there
is one number to change at a release; "unknown" when the code runs from a checkout that was
never installed (``pip install -e .`` fixes that).
"""

from __future__ import annotations

import argparse
import importlib.metadata

DISTRIBUTION = "pvs"


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG (pvs) VERSION`` and exit 0."""
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s (pvs) {package_version()}",
        help="print the pvs version and exit",
    )
