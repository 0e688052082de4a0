"""Replication status: which servers hold which copy of each vDisk, and whether it is good.

Pure functions of the site view, so that the admin API and its tests share one definition of
each status a copy can have:

- ``identical``: it carries the reference manifest (and its server found no damage);
- ``different``: it carries another manifest, another version; ``differences`` names the
  fields (version, timestamp, size, block size; content only when nothing else differs);
- ``damaged``: its server found content that does not match its own manifest; ``damage``
  says where (first bad offset), how much (bad blocks), found by what and since when;
- ``pending``: its server is still reading its manifest or checking the copy.

The reference is the manifest a new target would get (`balance.preferred_identity`) among the
copies that are not damaged, on servers that are up: never a vote, so a damaged copy never
becomes the reference, whatever its number of copies or its timestamps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from pvs_protocol import coordination as co
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import VersionState
from pvsd import balance
from pvsd.site import replica_of, replicas_of

JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """One server's copy of a vDisk, as the replication report sees it."""

    server: str
    state: str
    """serving, stopping, stopped, or down (not heard from recently)."""
    entry: co.ReplicaEntry
    is_self: bool = False
    local: Mapping[str, Any] | None = None
    """What the server itself says of its copy (``damage`` with found_by and since, ``scrub``
    progress), or None when it was not asked or did not answer in time: the coordination
    entry alone still gives the status."""


def views_of(holders: Iterable[Holder]) -> list[balance.ServerView]:
    """The holders as placement sees servers (no address or load: not needed here)."""
    by_server: dict[str, list[Holder]] = {}
    for holder in holders:
        by_server.setdefault(holder.server, []).append(holder)
    return [
        balance.ServerView(
            name, "", group[0].state == "serving",
            replicas=replicas_of(h.entry for h in group),
        )
        for name, group in sorted(by_server.items())
    ]


def reference_of(holders: Iterable[Holder]) -> ReplicaIdentity | None:
    """The manifest copies are compared with: the one an ordinary new target gets now (a
    pending version is not it yet); with no server serving, the preferred one among copies
    that are not damaged, on servers that are up if any of them has one."""
    holders = list(holders)
    if holders:
        wanted = balance.wanted_identity(views_of(holders), holders[0].entry.vdisk)
        if wanted is not None:
            return wanted
    good = [h for h in holders if not h.entry.damaged]
    up = [h.entry.identity for h in good if h.state != "down"]
    return balance.preferred_identity(up) or balance.preferred_identity(
        h.entry.identity for h in good
    )


def status_of(
    entry: co.ReplicaEntry, reference: ReplicaIdentity | None
) -> tuple[str, list[str]]:
    """A copy's status and, for ``different``, the fields in which its manifest differs."""
    if entry.damaged:
        return "damaged", []
    identity = entry.identity
    if identity is None or reference is None:
        return "pending", []
    reasons = manifest_differences(reference, identity)
    return ("different", reasons) if reasons else ("identical", [])


def manifest_differences(reference: ReplicaIdentity, other: ReplicaIdentity) -> list[str]:
    """The fields in which ``other``'s manifest differs from the reference's.

    The root covers version and creation time, so once one of those differs the roots differ
    too and say nothing of the blocks: "content" is named only when it is the one difference
    (same version made at the same time, other bytes: a copy that was changed and whose
    manifest was made again from it, or two images adopted with the same mtime).
    """
    names = reference.differences(other)
    if names == ["content"]:
        return names
    return [name for name in names if name != "content"]


def damage_of(holder: Holder) -> JSON | None:
    """Where the copy is damaged: from the coordination entry, with the server's own detail
    (what found it, since when) when it told us."""
    entry = holder.entry
    if not entry.damaged:
        return None
    detail = holder.local.get("damage") if holder.local is not None else None
    detail = detail if isinstance(detail, Mapping) else {}
    return {
        "first_offset": entry.damaged_at,
        "bad_blocks": entry.bad_blocks,
        "block_size": entry.identity.block_size if entry.identity is not None else None,
        "found_by": detail.get("found_by"),
        "since": detail.get("since"),
    }


def replication_report(holders: Iterable[Holder]) -> list[JSON]:
    """Per vDisk: who holds which manifest, and whether each copy matches the reference."""
    by_vdisk: dict[str, list[Holder]] = {}
    for holder in holders:
        by_vdisk.setdefault(holder.entry.vdisk, []).append(holder)
    report = []
    for name in sorted(by_vdisk):
        group = sorted(by_vdisk[name], key=lambda h: (not h.is_self, h.server))
        reference = reference_of(group)
        settings = settings_of(group[0].entry)
        versions = versions_report(group)
        by_version = {row["version"]: row for row in versions}
        replicas = []
        for holder in sorted(group, key=lambda h: (h.server, -h.entry.version)):
            identity = holder.entry.identity
            status, reasons = status_of(holder.entry, reference)
            version = by_version.get(holder.entry.version, {})
            copy = version.get("copies", {}).get(holder.server, {})
            own = settings_of(holder.entry)
            scrub = holder.local.get("scrub") if holder.local is not None else None
            replicas.append({
                "server": holder.server, "self": holder.is_self, "server_state": holder.state,
                "identity": identity.to_json() if identity is not None else None,
                "short": identity.short if identity is not None else "pending",
                "status": status, "differences": reasons, "damage": damage_of(holder),
                "version": holder.entry.version, "version_state": version.get("state"),
                "version_status": copy.get("status"), "version_pending": version.get("pending"),
                "current": reference is not None and identity == reference,
                "scrub": scrub if isinstance(scrub, Mapping) else None,
                "settings": own,
                "settings_differ": sorted(k for k in own if own[k] != settings[k]),
            })
        candidates = [
            r["server"] for r in replicas
            if r["status"] == "identical" and r["server_state"] == "serving"
        ]
        failover = balance.failover_allowed(replica_of(group[0].entry))
        report.append({
            "name": name,
            "versions": versions,
            "reference": reference.to_json() if reference is not None else None,
            "reference_short": reference.short if reference is not None else None,
            "settings": settings,
            "replicas": replicas,
            "damaged": [r["server"] for r in replicas if r["status"] == "damaged"],
            "failover_candidates": candidates,
            "failover_allowed": failover,
            "high_availability": failover and len(candidates) >= 2,
        })
    return report


def versions_report(holders: list[Holder]) -> list[JSON]:
    """Per version, newest first: its state, the copy targets get, whether it is pending
    (and which serving servers lack it), and every server's copy of it."""
    vdisk = holders[0].entry.vdisk
    views = views_of(holders)
    current = balance.wanted_identity(views, vdisk)
    rows = []
    for status in balance.versions_of(views, vdisk):
        copies = {}
        for holder in holders:
            if holder.entry.version != status.version:
                continue
            state, reasons = status_of(holder.entry, status.identity)
            copies[holder.server] = {
                "status": state, "differences": reasons, "server_state": holder.state,
                "short": holder.entry.identity.short if holder.entry.identity else "pending",
            }
        rows.append({
            "version": status.version, "state": str(status.state),
            "identity": status.identity.to_json() if status.identity is not None else None,
            "short": status.identity.short if status.identity is not None else None,
            # pending: a production version newer than the one targets get, held back
            # because some serving server lacks it
            "pending": status.pending and status.state is VersionState.production
            and (current is None or status.version > current.version),
            "holders": list(status.holders), "lacking": list(status.lacking),
            "copies": dict(sorted(copies.items())),
        })
    return rows


def settings_of(entry: co.ReplicaEntry) -> JSON:
    replica = replica_of(entry)
    return {
        "mode": str(replica.mode), "maintenance": replica.maintenance,
        "load_balancing": replica.load_balancing, "fixed_server": replica.fixed_server,
        "subnet_affinity": str(replica.affinity), "shared": replica.shared,
    }
