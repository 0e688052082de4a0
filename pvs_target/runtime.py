"""The files pvs-target runs from, for an initramfs (``python -m pvs_target.runtime``).

A diskless machine starts pvs-target before it has a root file system, so everything it will
ever load must be copied into the initramfs, and later into a directory the initramfs keeps
after the switch to the real root (the initramfs's own files are deleted then). Missing one
file would only show when it is first imported, perhaps during the first failover; so the
whole standard library goes (less what a daemon never imports), and of the installed packages
every file of each distribution pvs-target's modules come from, as pip recorded them.

Prints one absolute path per line: the interpreter first, then directories (copied whole)
and files. Exits 2 naming the cause when the installation cannot be copied this way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import pkgutil
import sys
import sysconfig
from pathlib import Path

STDLIB_LEFT_OUT = frozenset({
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "venv", "site-packages", "dist-packages", "__phello__",
})
"""Parts of the standard library a streaming daemon never imports (tests, GUIs, installers),
and the places of third-party packages, which are chosen one distribution at a time."""


class Unlistable(Exception):
    """The installation cannot be listed; the message says what to do."""


def _load_everything() -> None:
    """Import every module of the packages pvs-target runs, so that every distribution they
    use shows in ``sys.modules``."""
    for package_name in ("pvs_target", "pvs_protocol"):
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if not module.name.endswith((".__main__", ".runtime")):
                importlib.import_module(module.name)
    with contextlib.suppress(ImportError):  # the loop falls back to asyncio's without it
        importlib.import_module("uvloop")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _in_stdlib(origin: Path) -> bool:
    return origin.is_relative_to(_stdlib()) and not {"site-packages", "dist-packages"} & set(
        origin.parts
    )


def _stdlib_files() -> list[Path]:
    """Every file of the standard library but the parts left out and the static library
    (``config-*``, several MB that only compilers use)."""
    files: list[Path] = []
    for directory, subdirectories, names in os.walk(_stdlib()):
        subdirectories[:] = sorted(
            name for name in subdirectories
            if name not in STDLIB_LEFT_OUT and not name.startswith("config-")
        )
        files.extend(Path(directory, name) for name in sorted(names))
    return files


def _distributions(before: set[str]) -> list[importlib.metadata.Distribution]:
    """The distributions of every module pvs-target's modules loaded from outside the
    standard library (not those the interpreter's start loaded for this process, such as
    setuptools' ``.pth`` hook: their distributions are not copied, so nothing loads them)."""
    owners = importlib.metadata.packages_distributions()
    names: set[str] = set()
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if origin is None or name in before or _in_stdlib(Path(origin)):
            continue
        top = name.partition(".")[0]
        if top not in owners:
            raise Unlistable(
                f"module {name} ({origin}) belongs to no installed distribution: install pvs "
                "with pip (not an editable install) where pvs-target runs"
            )
        names.update(owners[top])
    for name in sorted(names):
        if _editable(name):
            raise Unlistable(
                f"distribution {name} is an editable install (pip install -e): its modules "
                "are read from a source tree its record does not list; install it with pip "
                "(not editable) where pvs-target runs"
            )
    return [importlib.metadata.distribution(name) for name in sorted(names)]


def _editable(name: str) -> bool:
    """Whether pip recorded any installation of ``name`` as editable (PEP 610's
    ``direct_url.json``): its files are then the import hook, not the modules, and a listing
    would leave out the modules without failing."""
    for distribution in importlib.metadata.distributions(name=name):
        try:
            direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
            if direct_url.get("dir_info", {}).get("editable") is True:
                return True
        except (ValueError, AttributeError):  # a record that is not what PEP 610 says
            continue
    return False


def _link_chain(path: Path) -> list[Path]:
    """The path, each symbolic link it leads through, and the file at the end."""
    chain = [path]
    while path.is_symlink() and len(chain) < 40:
        path = (path.parent / path.readlink()).absolute()
        chain.append(path)
    return chain


def runtime_files() -> list[Path]:
    """The interpreter (as called and as it really is), the virtual environment's marker,
    the standard library, and every file of every distribution in use."""
    before = set(sys.modules)
    _load_everything()
    paths = _link_chain(Path(sys.executable))
    if sys.prefix != sys.base_prefix:
        paths.append(Path(sys.prefix, "pyvenv.cfg"))
    paths.extend(_stdlib_files())
    for distribution in _distributions(before):
        for file in distribution.files or ():
            located = Path(os.path.normpath(str(distribution.locate_file(file))))
            if located.is_file() and located.parent.name != "bin":  # not console scripts
                paths.append(located)
    return list(dict.fromkeys(path.absolute() for path in paths))


def main() -> int:
    try:
        paths = runtime_files()
    except (Unlistable, ImportError) as error:
        print(f"pvs_target.runtime: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
