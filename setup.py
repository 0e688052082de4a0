"""Compile the per-request hot path with mypyc when a wheel is built; pure Python otherwise.

Measured in docs/benchmarks.md ("Compiling the hot path"): compiled, these modules cost a
fifth to a third less server CPU per 4 KiB request at queue depth 32. Everything else is
declared in pyproject.toml.

What is compiled, and when:
- ``pip install .`` and ``pip wheel .`` (a deployment) compile ``HOT_PATH`` into the wheel.
- ``pip install -e .`` (scripts/bootstrap, every developer) compiles nothing: a compiled
  module is an ``.so`` beside its ``.py`` that Python prefers to it, so an editable install
  that compiled would keep running the old code after every edit of wire.py. The work tree
  therefore always runs the sources as they are.
- ``PVS_PURE=1`` in the environment, no mypyc, mypyc refusing the code, or no C compiler:
  the pure modules are installed, with a warning; nothing else changes (they are the same
  modules, only slower).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOT_PATH = [
    # the stream protocol's frames (both sides, every request)
    "pvs_protocol/wire.py",
    "pvs_protocol/errors.py",
    "pvs_protocol/identity.py",
    "pvs_protocol/modes.py",
    "pvs_protocol/manifest.py",
    # pvs-target: the stream client, the block checks, the NBD export's protocol
    "pvs_target/address.py",
    "pvs_target/connection.py",
    "pvs_target/verify.py",
    "pvs_target/nbd/wire.py",
    "pvs_target/nbd/events.py",
    "pvs_target/nbd/protocol.py",
]
"""Not compiled (docs/benchmarks.md): pvs_protocol/connection.py and events.py, because
compiled classes have no ``__dict__`` and compiled frozen dataclasses cannot be copied or
pickled, and the protocol tests deep-copy a ``Connection`` (with the HELLO it holds) and
compare its ``__dict__``; pvs_protocol/buffers.py, because ``PoolBuffer`` subclasses
``bytearray``, which mypyc cannot compile."""

BUILDS = {"bdist_wheel", "build", "build_ext", "install"}
"""The commands that make an installable copy; ``editable_wheel`` (``pip install -e``),
``egg_info`` and ``dist_info`` are not among them."""


def hot_path_extensions() -> list[Any]:
    """The mypyc extensions, or none (then the pure modules are what gets installed)."""
    if os.environ.get("PVS_PURE") == "1" or not BUILDS.intersection(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("pvs: mypyc is not installed: installing the pure modules", file=sys.stderr)
        return []
    try:  # setuptools runs this in the project directory: HOT_PATH is relative to it
        return list(mypycify(HOT_PATH, opt_level="3", group_name="pvs_hot_path"))
    except (Exception, SystemExit) as error:  # mypyc exits on a type error
        print(f"pvs: mypyc failed ({error!r}): installing the pure modules", file=sys.stderr)
        return []


class BuildHotPath(build_ext):
    """All compiled or none: if any extension fails to build (no compiler, no headers),
    drop every one built so far and keep the pure modules. A partial set would not do:
    mypyc's modules call one another inside its shared library."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # distutils' CompileError/LinkError, or OSError
            for extension in self.extensions:
                Path(self.get_ext_fullpath(extension.name)).unlink(missing_ok=True)
            print(
                f"pvs: compiling the hot path failed ({error}): installing the pure modules",
                file=sys.stderr,
            )


setup(ext_modules=hot_path_extensions(), cmdclass={"build_ext": BuildHotPath})
