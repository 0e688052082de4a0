"""The manual pages in man/ are what scripts/manpages makes from the parsers, and render cleanly.

A page that lags behind an option added or renamed tells an administrator something false, so
the committed pages are regenerated here and compared; each is rendered the way ``man`` does
(with every warning on), and a warning fails the test.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
SCRIPT = ROOT / "scripts" / "manpages.py"
PAGES = ("pvsd.8", "pvsctl.8", "pvs-target.8")
PARSERS = {
    "pvsd": ("pvsd.config", ("build_parser",)),
    "pvsctl": ("pvsd.ctl", ("build_parser",)),
    "pvs-target": ("pvs_target.__main__", ("build_parser", "_parser")),
}
_DATE_LINE = re.compile(r'^\.TH (\S+) "8" "[^"]*" ', re.MULTILINE)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, check=False, cwd=ROOT,
    )


def undated(text: str) -> str:
    return _DATE_LINE.sub(r'.TH \1 "8" "" ', text)


def render(page: Path) -> subprocess.CompletedProcess[str]:
    """Format ``page`` as man does, with warnings: man -l if installed, else groff."""
    environment = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MANPAGER": "cat"}
    if shutil.which("man"):
        command = ["man", "--warnings=w", "-l", str(page)]  # w: every groff warning
    elif shutil.which("groff"):
        command = ["groff", "-man", "-Tutf8", "-ww", str(page)]
    else:
        pytest.skip("neither man nor groff is installed (apt-get install man-db groff-base)")
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=environment,
        stdin=subprocess.DEVNULL, check=False,
    )


def test_the_committed_pages_are_current() -> None:
    checked = run_script("--check")
    assert checked.returncode == 0, (
        f"{checked.stderr}\nman/ lags behind the parsers: run scripts/manpages and commit man/"
    )


def test_regenerating_makes_the_same_pages(tmp_path: Path) -> None:
    made = run_script("--output", str(tmp_path))
    assert made.returncode == 0, made.stderr
    for name in PAGES:
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        committed = (MAN / name).read_text(encoding="utf-8")
        assert undated(fresh) == undated(committed), f"man/{name} differs from a fresh one"
    again = run_script("--output", str(tmp_path))
    assert again.returncode == 0 and "wrote" not in again.stdout, "an unchanged page keeps its date"


@pytest.mark.parametrize("name", PAGES)
def test_each_page_renders_without_warnings(name: str) -> None:
    rendered = render(MAN / name)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stderr == "", rendered.stderr
    text = rendered.stdout
    for heading in ("NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert heading in text, (name, heading)
    program = name.removesuffix(".8")
    assert re.search(rf"\b{program}\s+- ", text), text[:300]


def test_the_rendering_check_sees_a_broken_page(tmp_path: Path) -> None:
    """The check above would pass vacuously if warnings went unseen."""
    broken = tmp_path / "broken.8"
    broken.write_text('.TH BROKEN "8" "" "pvs" "x"\n.SH NAME\nbroken\n.XQ not a macro\n')
    assert render(broken).stderr != ""


def test_pvsctl_page_lists_its_commands_and_global_options() -> None:
    text = (MAN / "pvsctl.8").read_text(encoding="utf-8")
    for expected in ("vdisk show", "vdisk manifest", r"\-\-verbose", r"\-\-version", "PVS_STORE"):
        assert expected in text, expected


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_every_option_and_command_has_help(program: str) -> None:
    """An option without help is a blank line in --help and in the man page."""
    module_name, functions = PARSERS[program]
    module = importlib.import_module(module_name)
    build = next(getattr(module, name) for name in functions if hasattr(module, name))
    lacking = list(_lacking_help(build(), program))
    assert not lacking, f"{program}: no help text for {', '.join(lacking)}"


def _lacking_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    lacking = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest: choice.help for choice in action._choices_actions}
            for name, command in action.choices.items():
                if not described.get(name):
                    lacking.append(f"command '{path} {name}'")
                lacking += _lacking_help(command, f"{path} {name}")
        elif not action.help:
            option = "/".join(action.option_strings) or action.dest
            lacking.append(f"'{path} {option}'")
    return lacking
