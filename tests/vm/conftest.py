"""The VM tests: a diskless virtual machine booted from a loopback site (deploy/vm.py).

They need root (debootstrap, chroot, mkinitramfs), qemu-system-x86_64, socat and a Debian
mirror the first time (the image is built once into ``PVS_DISKLESS_WORKDIR``, default
/var/tmp/pvs-diskless, and reused). Without them they are skipped with the reason. They take
minutes: ``./scripts/test`` runs them apart from the main suite (``-m vm``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
if str(DEPLOY) not in sys.path:
    sys.path.insert(0, str(DEPLOY))  # deploy/vm.py and deploy/diskless.py are scripts

import diskless  # noqa: E402
import vm  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a diskless virtual machine (root, qemu); see docs/diskless.md"
    )


@pytest.fixture(scope="session")
def diskless_image() -> Iterator[Path]:
    """kernel, initramfs and root.img of a Debian machine with the verifying workload."""
    if os.geteuid() != 0:
        pytest.skip("the diskless image is built with debootstrap and chroot: run as root")
    missing = vm.missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install qemu-system-x86 socat "
                    "debootstrap e2fsprogs")
    workdir = Path(os.environ.get("PVS_DISKLESS_WORKDIR", "/var/tmp/pvs-diskless"))
    try:
        yield diskless.build(workdir, check=True, size="2G", suite=diskless.SUITE,
                             mirror=diskless.MIRROR)
    except diskless.Unreachable as error:
        pytest.skip(f"cannot build the diskless image here now: {error}")
    except diskless.BuildError as error:
        pytest.fail(f"building the diskless image: {error}")
