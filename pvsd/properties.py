"""The properties file beside each image: ``NAME.img`` is described by ``NAME.vdisk.toml``.

The file is meant to be edited by hand as well as by ``pvsctl vdisk set``, so it is checked
completely when read: a typo must stop the vDisk from being served with a meaning nobody asked
for, and the error names the file, the key and the fix. A missing file means all defaults.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import tempfile
import textwrap
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path

from pvs_protocol.modes import Mode, SubnetAffinity, VersionState
from pvsd.versions import parse_key

SUFFIX = ".vdisk.toml"
MAX_VERSION = 2**32 - 1
"""Versions travel in a 32-bit field."""
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 65536

_HELP: dict[str, str] = {
    "mode": "standard: read-only, shared by many targets, each keeping its writes in its own"
    " cache; private: one target at a time, writing into the image",
    "maintenance": "true while an administrator updates the image; it is not given to"
    " ordinary targets",
    "version": "raise it with every released change of the image; part of the replica identity,"
    " so all copies on all servers must carry the same number",
    "description": "free text for administrators",
    "load_balancing": "true: any server with an identical copy may serve it; false: only"
    " fixed_server",
    "fixed_server": "the server that serves this vDisk when load_balancing is false",
    "subnet_affinity": "none: any server; best_effort: prefer a server on the target's subnet;"
    " fixed: only servers on the target's subnet",
    "block_size": "block (sector) size offered to targets, in bytes: a power of two from 512"
    " to 65536",
    "test_devices": "device ids (or globs such as \"lab-*\") that get test versions",
    "maintenance_devices": "device ids (or globs) that may write a maintenance version; one"
    " at a time",
    "versions": "the state of each version: maintenance (being written), test (test devices"
    " only) or production (every target); a version not listed is production. Change them"
    " with `pvsctl vdisk version promote`",
}
MAX_DEVICE_PATTERNS = 64


class PropertiesError(ValueError):
    """A properties value that cannot be used; says where, which key, and what to do."""

    def __init__(self, key: str, problem: str, path: Path | None = None) -> None:
        super().__init__(key, problem, path)
        self.key = key
        self.problem = problem
        self.path = path

    def at(self, path: Path) -> PropertiesError:
        return PropertiesError(self.key, self.problem, path)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}{self.key}: {self.problem}"


@dataclasses.dataclass(frozen=True, slots=True)
class VDiskProperties:
    mode: Mode = Mode.standard
    maintenance: bool = False
    version: int = 1
    description: str = ""
    load_balancing: bool = True
    fixed_server: str = ""
    subnet_affinity: SubnetAffinity = SubnetAffinity.none
    block_size: int = 4096
    test_devices: tuple[str, ...] = ()
    maintenance_devices: tuple[str, ...] = ()
    versions: Mapping[int, VersionState] = dataclasses.field(default_factory=dict)
    """Version number -> state; a version not listed is production."""

    def state_of(self, version: int) -> VersionState:
        return self.versions.get(version, VersionState.production)

    def with_state(self, version: int, state: VersionState | None) -> VDiskProperties:
        versions = {n: s for n, s in self.versions.items() if n != version}
        if state is not None:
            versions[version] = state
        return dataclasses.replace(self, versions=dict(sorted(versions.items())))

    def __post_init__(self) -> None:
        if not 0 <= self.version <= MAX_VERSION:
            raise PropertiesError(
                "version", f"{self.version} is out of range; use 0 to {MAX_VERSION}"
            )
        size = self.block_size
        if not (MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE and size & (size - 1) == 0):
            raise PropertiesError(
                "block_size",
                f"{size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE};"
                " use 512 or 4096",
            )
        if self.fixed_server != self.fixed_server.strip() or "\n" in self.fixed_server:
            raise PropertiesError(
                "fixed_server", "has surrounding blanks or a line break; write the bare name"
            )
        if len(self.fixed_server) > 64:
            raise PropertiesError(
                "fixed_server", "is longer than 64 characters; server names are at most 64"
            )
        for key in ("test_devices", "maintenance_devices"):
            patterns: tuple[str, ...] = getattr(self, key)
            if len(patterns) > MAX_DEVICE_PATTERNS or any(
                not 0 < len(p) <= 128 or p != p.strip() for p in patterns
            ):
                raise PropertiesError(
                    key, f"use at most {MAX_DEVICE_PATTERNS} device ids or globs, each 1 to 128"
                    " characters without surrounding blanks",
                )
        for version in self.versions:
            if not 0 <= version <= MAX_VERSION:
                raise PropertiesError("versions", f"version {version} is out of range")
        if not self.load_balancing and not self.fixed_server:
            raise PropertiesError(
                "fixed_server",
                "is empty while load_balancing is off, so no server would serve the vDisk;"
                " name the serving server, or turn load_balancing on",
            )

    def to_mapping(self) -> dict[str, object]:
        """As TOML would hold it (version keys as text)."""
        values: dict[str, object] = {
            field.name: getattr(self, field.name) for field in dataclasses.fields(self)
        }
        values["test_devices"] = list(self.test_devices)
        values["maintenance_devices"] = list(self.maintenance_devices)
        values["versions"] = {str(n): str(s) for n, s in sorted(self.versions.items())}
        return values

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> VDiskProperties:
        """Build from parsed TOML, checking the type of every key before its value."""
        types = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for key, raw in data.items():
            if key not in types:
                raise PropertiesError(
                    key, f"unknown key; fix its spelling or remove it (known: {', '.join(types)})"
                )
            values[key] = _convert(key, types[key], raw)
        return cls(**values)  # type: ignore[arg-type]  # each value was checked by _convert


def _convert(key: str, kind: type, raw: object) -> object:
    if key in ("test_devices", "maintenance_devices"):
        if not isinstance(raw, list | tuple) or not all(isinstance(p, str) for p in raw):
            raise PropertiesError(key, f"{raw!r} has the wrong type; use a list of \"texts\"")
        return tuple(raw)
    if key == "versions":
        return _versions(raw)
    if issubclass(kind, enum.StrEnum):
        if not isinstance(raw, str) or raw not in kind.__members__:
            allowed = " or ".join(f'"{member}"' for member in kind.__members__)
            raise PropertiesError(key, f"{raw!r} is not allowed; use {allowed}")
        return kind(raw)
    # bool is a subclass of int, so `version = true` must be refused explicitly.
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        example = {bool: "true or false", int: "a whole number", str: 'text in "quotes"'}[kind]
        raise PropertiesError(key, f"{raw!r} has the wrong type; use {example}")
    return raw


def _versions(raw: object) -> dict[int, VersionState]:
    if not isinstance(raw, Mapping):
        raise PropertiesError("versions", f"{raw!r} is not a table; write [versions] then 3 = "
                              '"production" lines')
    states: dict[int, VersionState] = {}
    for number, state in raw.items():
        text = str(number)
        if not text.isdigit() or len(text) > 10:
            raise PropertiesError("versions", f"{text!r} is not a version number")
        if not isinstance(state, str) or state not in VersionState.__members__:
            allowed = " or ".join(f'"{s}"' for s in VersionState.__members__)
            raise PropertiesError("versions", f"version {text}: {state!r}; use {allowed}")
        states[int(text)] = VersionState(state)
    return dict(sorted(states.items()))


def set_version_state(path: Path, version: int, state: VersionState | None) -> VDiskProperties:
    """Record a version's state (None: forget the version) in the properties file at
    ``path``, keeping every other setting; returns what was written."""
    updated = load_properties(path).with_state(version, state)
    save_properties(path, updated)
    return updated


def properties_path(image: Path) -> Path:
    """``store/NAME.img`` or ``store/NAME@N.img`` -> ``store/NAME.vdisk.toml``: one file
    for every version of a vDisk."""
    name, _version = parse_key(image.name.removesuffix(".img"))
    return image.with_name(name + SUFFIX)


def load_properties(path: Path) -> VDiskProperties:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        return VDiskProperties()
    except tomllib.TOMLDecodeError as error:
        raise PropertiesError("(syntax)", f"{error}; fix the TOML syntax", path) from None
    except (OSError, UnicodeDecodeError) as error:
        problem = f"cannot be read ({error}); make it a readable file"
        raise PropertiesError("(file)", problem, path) from None
    try:
        return VDiskProperties.from_mapping(data)
    except PropertiesError as error:
        raise error.at(path) from None


def dump_properties(properties: VDiskProperties) -> str:
    lines = ["# vDisk properties, read by pvsd and changed by `pvsctl vdisk set`.", "#"]
    for key, text in _HELP.items():
        wrapped = textwrap.wrap(f"{key}: {text}", width=76, subsequent_indent="  ")
        lines += [f"# {line}" for line in wrapped]
    lines.append("")
    values = properties.to_mapping()
    versions = values.pop("versions")
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key} = [{', '.join(_toml_value(str(v)) for v in value)}]")
        else:
            assert isinstance(value, str | int | float | bool)
            lines.append(f"{key} = {_toml_value(value)}")
    assert isinstance(versions, dict)
    lines += ["", "[versions]"] + [f'"{n}" = {_toml_value(s)}' for n, s in versions.items()]
    return "\n".join(lines) + "\n"


def save_properties(path: Path, properties: VDiskProperties) -> None:
    """Replace the file atomically, so a watching pvsd never reads half of it."""
    write_atomically(path, dump_properties(properties))


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``.

    The temporary name starts with a dot and does not end in ``.img``, so a store scan never
    mistakes it for an image. An existing file's permissions are kept; a new one is 0644
    (a temporary file would otherwise leave it readable by its owner only).
    """
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as file:
        try:
            os.fchmod(file.fileno(), mode)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        except BaseException:
            os.unlink(file.name)
            raise
    os.replace(file.name, path)


def _toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return '"' + "".join(_ESCAPES.get(char, char) for char in value) + '"'


_ESCAPES = {
    **{chr(code): f"\\u{code:04X}" for code in [*range(0x20), 0x7F]},
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
    '"': '\\"',
    "\\": "\\\\",
}
