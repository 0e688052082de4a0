"""How pvsctl prints its tables on stdout: wrapped to a terminal, never cut, whole in a pipe.

On a terminal a table fits the window: cells wrap at spaces and a word longer than its column
(an address, a digest) is folded onto the next line rather than cut with an ellipsis, since a
cut server name or address is useless. In a pipe (``| less -S``, ``| grep``, a file) there is
no window to fit: each row stays one line however wide, so that grep finds it whole.

Cell text is never read as rich markup: ``[fe80::1]:6911`` is an address, not a style tag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from pvsd.console import UserError

UNLIMITED = 1 << 20
"""The width given to rich for a pipe: no real line is that long."""


def stdout_console() -> Console:
    """The console for results: the terminal's width, or no limit in a pipe."""
    if sys.stdout.isatty():
        return Console(markup=False)
    return Console(width=UNLIMITED, markup=False)


def print_table(table: Table) -> None:
    for column in table.columns:
        column.overflow = "fold"
    stdout_console().print(table)


def print_json(args: argparse.Namespace, answer: Mapping[str, Any]) -> bool:
    """With ``--json``, print the API's answer as it came and say so (the caller prints
    nothing else)."""
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
        return True
    return False


def answer_list(answer: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """The objects of a list in an API answer; an answer without that list is not a pvsd's."""
    value = answer.get(key, [])
    if not isinstance(value, list):
        raise UserError(f"the admin API answered without a '{key}' list: is it a pvsd?")
    return [item for item in value if isinstance(item, dict)]
