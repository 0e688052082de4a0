"""vDisk modes, subnet affinity and version states: as text for the properties file, as wire codes.

They live in the protocol package so that both ends can encode them without importing pvsd.
The text values are what an administrator writes; the codes are what travels, and both are
fixed forever: a code is never reused for another meaning.
"""

from __future__ import annotations

import enum
from typing import TypeVar

_E = TypeVar("_E", bound=enum.Enum)


class Mode(enum.StrEnum):
    standard = "standard"
    """Read-only image shared by many targets; each target keeps its writes in its own cache."""
    private = "private"
    """One target at a time, writing straight into the image."""

    @property
    def code(self) -> int:
        return _MODE_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Mode:
        return _lookup(cls, _MODE_CODES, code)


class SubnetAffinity(enum.StrEnum):
    none = "none"
    """Any server may serve the target."""
    best_effort = "best_effort"
    """Prefer a server on the target's subnet, fall back to any other."""
    fixed = "fixed"
    """Only servers on the target's subnet."""

    @property
    def code(self) -> int:
        return _AFFINITY_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> SubnetAffinity:
        return _lookup(cls, _AFFINITY_CODES, code)


class VersionState(enum.StrEnum):
    """Where a version of a vDisk is in its life: written, tried, then given to everyone.

    Ordered: a version only moves up (`promote`), and the least released state wins when
    servers disagree (a version is production only where every holder says so)."""

    maintenance = "maintenance"
    """Being written by the one maintenance device; no other target gets it."""
    test = "test"
    """Read-only; only test devices get it."""
    production = "production"
    """Read-only; every target may get it once every serving server holds it."""

    @property
    def code(self) -> int:
        return _STATE_CODES[self]

    @property
    def rank(self) -> int:
        return _STATE_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> VersionState:
        return _lookup(cls, _STATE_CODES, code)


_MODE_CODES: dict[Mode, int] = {Mode.standard: 1, Mode.private: 2}
_AFFINITY_CODES: dict[SubnetAffinity, int] = {
    SubnetAffinity.none: 0,
    SubnetAffinity.best_effort: 1,
    SubnetAffinity.fixed: 2,
}

_STATE_CODES: dict[VersionState, int] = {
    VersionState.maintenance: 1,
    VersionState.test: 2,
    VersionState.production: 3,
}


def _lookup(kind: type[_E], codes: dict[_E, int], code: int) -> _E:
    for member, member_code in codes.items():
        if member_code == code:
            return member
    raise ValueError(f"unknown {kind.__name__} code {code}")
