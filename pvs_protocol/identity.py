"""Replica identity: what makes two copies of a vDisk interchangeable.

A target that has streamed from one replica may only ever continue on a replica that holds
exactly the same bytes, or it would see a disk that changed under it. Size and timestamp alone
are not enough (copy tools have been seen to keep both while the content differed), and content
alone is not enough either: the same change made to two copies gives two versions that an
administrator did not make as one. So all four fields must match.
"""

from __future__ import annotations

import dataclasses

DIGEST_SIZE = 32
"""SHA-256, so that an administrator can check a replica with ``sha256sum``."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    version: int
    """The vDisk version from its properties file."""
    timestamp_ns: int
    """Modification time of the image, nanoseconds since the epoch (kept by cp -p, rsync -t)."""
    size: int
    """Image size in bytes."""
    digest: bytes
    """SHA-256 of the whole image."""

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(self.digest)}")
        if self.version < 0 or self.timestamp_ns < 0 or self.size < 0:
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
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ReplicaIdentity:
        version, timestamp_ns, size, digest = (
            data["version"], data["timestamp_ns"], data["size"], data["digest"],
        )
        if not (
            isinstance(version, int)
            and isinstance(timestamp_ns, int)
            and isinstance(size, int)
            and isinstance(digest, str)
        ):
            raise ValueError("malformed identity record")
        return cls(version, timestamp_ns, size, bytes.fromhex(digest))
