"""The compiled hot path (setup.py) can never make a checkout run code older than its sources.

A compiled module is an ``.so`` beside its ``.py``, and Python imports the ``.so`` first: in a
work tree, one left by a manual ``build_ext --inplace`` or ``mypyc`` run would go on serving
the old wire.py after every edit. setup.py compiles only into wheels; these tests catch a
compiled file that got into a checkout anyway, and a HOT_PATH entry that no longer names a
module (which would silently stop compiling it).
"""

from __future__ import annotations

import ast
import importlib.machinery
from pathlib import Path

import pytest

import pvs_protocol
import pvs_target
import pvsd

PACKAGES = [Path(package.__path__[0]) for package in (pvs_protocol, pvs_target, pvsd)]
ROOT = PACKAGES[0].parent
CHECKOUT = (ROOT / "setup.py").exists() and (ROOT / "pyproject.toml").exists()
"""The packages are imported from a source tree (an editable install, PYTHONPATH), not from
an installed wheel, where compiled modules are expected."""


def compiled_files(directory: Path) -> list[Path]:
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(path for path in directory.rglob("*") if path.name.endswith(suffixes))


def test_no_compiled_module_shadows_a_source_in_a_checkout() -> None:
    if not CHECKOUT:
        pytest.skip("an installed wheel: compiled modules are what it should hold")
    found = [path for package in PACKAGES for path in compiled_files(package)]
    found += [path for path in ROOT.glob("*__mypyc*") if path.is_file()]
    assert not found, (
        f"compiled modules in the work tree would run instead of their sources: {found}; "
        "delete them (setup.py compiles only into wheels)"
    )


def test_every_hot_path_entry_names_a_module() -> None:
    if not CHECKOUT:
        pytest.skip("an installed wheel has no setup.py")
    tree = ast.parse((ROOT / "setup.py").read_text())
    [entries] = [
        node.value for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(target, ast.Name) and target.id == "HOT_PATH" for target in node.targets)
    ]
    paths = ast.literal_eval(entries)
    assert paths
    for path in paths:
        assert (ROOT / path).is_file(), f"setup.py's HOT_PATH names {path}, which is gone"
