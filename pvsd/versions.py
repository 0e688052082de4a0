"""Versions of a vDisk: how they are named in a store, and what each state allows.

A version is a full image of its own (``NAME@N.img`` beside ``NAME@N.manifest``), never a
delta over another: the serving path stays one read from one file, a version can be copied,
checked, damaged or deleted without touching any other, and a new version is made by copying
the newest (reflinked where the filesystem can, holes kept). docs/benchmarks.md, "Versions:
full images or base plus deltas", has the figures behind the choice. A plain ``NAME.img`` is
still a vDisk with one version, the number its manifest carries.

Which version a device gets is decided in `pvsd.balance` from the states below and the
device's class (`device_class`): ordinary devices get production versions only, test devices
test or production, and the one maintenance device the maintenance version it writes.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Iterable

from pvs_protocol.modes import VersionState

__all__ = ["DeviceClass", "VersionState", "device_class", "image_file", "key_of", "parse_key"]

IMAGE_SUFFIX = ".img"
_VERSIONED = re.compile(r"(?P<name>.+)@(?P<version>[0-9]{1,10})")
"""``@`` is never part of a vDisk name (`pvsd.names`): a version's file cannot be mistaken
for another vDisk."""


class DeviceClass(enum.StrEnum):
    ordinary = "ordinary"
    test = "test"
    maintenance = "maintenance"

    def may_get(self, state: VersionState) -> bool:
        """Whether a device of this class may stream a version in ``state``."""
        if self is DeviceClass.maintenance:
            return True
        if self is DeviceClass.test:
            return state is not VersionState.maintenance
        return state is VersionState.production


def key_of(name: str, version: int) -> str:
    """The file stem of version ``version`` of vDisk ``name``: also its catalog key."""
    return f"{name}@{version}"


def image_file(name: str, version: int) -> str:
    return key_of(name, version) + IMAGE_SUFFIX


def parse_key(stem: str) -> tuple[str, int | None]:
    """``NAME@N`` -> (NAME, N); a plain ``NAME`` -> (NAME, None): its manifest says which."""
    match = _VERSIONED.fullmatch(stem)
    if match is None:
        return stem, None
    return match["name"], int(match["version"])


def device_class(
    device_id: str, *, test: Iterable[str] = (), maintenance: Iterable[str] = ()
) -> DeviceClass:
    """A device's class from the vDisk's lists of device-id globs (maintenance first)."""
    if any(fnmatch.fnmatchcase(device_id, pattern) for pattern in maintenance):
        return DeviceClass.maintenance
    if any(fnmatch.fnmatchcase(device_id, pattern) for pattern in test):
        return DeviceClass.test
    return DeviceClass.ordinary
