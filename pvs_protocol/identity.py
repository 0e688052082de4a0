"""Replica identity: what makes two copies of a vDisk interchangeable.

A target that has streamed from one replica may only ever continue on a replica that holds
exactly the same bytes, or it would see a disk that changed under it. The identity is that of
the version's manifest (``pvs_protocol/manifest.py``): its root digest covers the content block
by block *and* the version number and the time the version was made, so the same change made
to two copies gives two manifests, two versions an administrator did not make as one. A copy
is identical only when it carries the same manifest and its content matches it; a copy whose
content does not match its own manifest is damaged, which its server finds and reports apart
from the identity (see ``pvsd/manifest.py``).
"""

from __future__ import annotations

import dataclasses
import string

DIGEST_SIZE = 32
"""The manifest's root digest (keyed BLAKE3, 256 bits)."""
DEFAULT_BLOCK_SIZE = 16384
TOKEN_FIELDS = (("version", 32), ("timestamp", 64), ("size", 64), ("block size", 32))
"""The token's numbers and their widths in a pinned login (``pvs_protocol/wire.py``): a
larger number names no version a server could hold, and could not even be sent."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    version: int
    """The vDisk version from its properties file."""
    timestamp_ns: int
    """When the version (its manifest) was made, nanoseconds since the epoch."""
    size: int
    """Image size in bytes."""
    digest: bytes
    """Root of the manifest's hash tree: content, version and creation time in one."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Bytes per manifest block: the unit in which a target checks what it receives."""

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(self.digest)}")
        if self.version < 0 or self.timestamp_ns < 0 or self.size < 0 or self.block_size <= 0:
            raise ValueError("identity fields must not be negative")

    def differences(self, other: ReplicaIdentity) -> list[str]:
        """Name each field in which ``other`` differs, in the order an admin checks them.

        An empty list means the replicas are identical.
        """
        names = []
        if self.version != other.version:
            names.append("version")
        if self.timestamp_ns != other.timestamp_ns:
            names.append("timestamp")
        if self.size != other.size:
            names.append("size")
        if self.block_size != other.block_size:
            names.append("block size")
        if self.digest != other.digest:
            names.append("content")
        return names

    def is_identical(self, other: ReplicaIdentity) -> bool:
        return self == other

    @property
    def short(self) -> str:
        """A compact label for logs and tables: version and the first digest bytes."""
        return f"v{self.version}:{self.digest.hex()[:12]}"

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "timestamp_ns": self.timestamp_ns,
            "size": self.size,
            "digest": self.digest.hex(),
            "block_size": self.block_size,
        }

    def token(self) -> str:
        """The whole identity in one word, for a kernel command line (``pvs.identity=``): a
        machine that boots a version's kernel must get that version's root, or its modules
        would not match the kernel."""
        return (
            f"{self.version}-{self.timestamp_ns}-{self.size}-{self.block_size}-{self.digest.hex()}"
        )

    @classmethod
    def from_token(cls, token: str) -> ReplicaIdentity:
        """Read :meth:`token`'s form; ValueError names what is wrong."""
        parts = token.split("-")
        if len(parts) != 5 or not all(part.isdigit() and part.isascii() for part in parts[:4]):
            raise ValueError(
                f"not an identity token (VERSION-TIMESTAMPNS-SIZE-BLOCKSIZE-DIGEST): {token!r}"
            )
        numbers = []
        for (name, bits), part in zip(TOKEN_FIELDS, parts[:4], strict=True):
            # the length first: int() of thousands of digits is slow and says something else
            if len(part) > 20 or int(part) >> bits:
                raise ValueError(f"identity token {name} is above {(1 << bits) - 1}")
            numbers.append(int(part))
        version, timestamp_ns, size, block_size = numbers
        digest = parts[4]
        if len(digest) != 2 * DIGEST_SIZE or not all(c in string.hexdigits for c in digest):
            raise ValueError(
                f"identity token digest is not {2 * DIGEST_SIZE} hexadecimal digits: {digest!r}"
            )
        return cls(version, timestamp_ns, size, bytes.fromhex(digest), block_size)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ReplicaIdentity:
        version, timestamp_ns, size, digest = (
            data["version"], data["timestamp_ns"], data["size"], data["digest"],
        )
        block_size = data.get("block_size", DEFAULT_BLOCK_SIZE)
        if not (
            isinstance(version, int)
            and isinstance(timestamp_ns, int)
            and isinstance(size, int)
            and isinstance(digest, str)
            and isinstance(block_size, int)
        ):
            raise ValueError("malformed identity record")
        return cls(version, timestamp_ns, size, bytes.fromhex(digest), block_size)
