"""Replication status: which servers hold which copy of each vDisk, and whether it matches.

Pure functions of the site view, so that the admin API and its tests share one definition of
"identical", "different (and why)" and "pending".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pvs_protocol import coordination as co
from pvsd import balance
from pvsd.site import replica_of

JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """One server's copy of a vDisk, as the replication report sees it."""

    server: str
    state: str
    """serving, stopping, stopped, or down (not heard from recently)."""
    entry: co.ReplicaEntry
    is_self: bool = False



def replication_report(holders: Iterable[Holder]) -> list[JSON]:
    """Per vDisk: who holds which identity, and whether it matches the site's reference copy.

    The reference is the identity placement would give a new target
    (`balance.preferred_identity` over the servers that are up).
    """
    by_vdisk: dict[str, list[Holder]] = {}
    for holder in holders:
        by_vdisk.setdefault(holder.entry.vdisk, []).append(holder)
    report = []
    for name in sorted(by_vdisk):
        group = sorted(by_vdisk[name], key=lambda h: (not h.is_self, h.server))
        up = [h for h in group if h.state != "down"]
        reference = balance.preferred_identity(h.entry.identity for h in up or group)
        settings = settings_of(group[0].entry)
        replicas = []
        for holder in sorted(group, key=lambda h: h.server):
            identity = holder.entry.identity
            reasons: list[str] = []
            if identity is None or reference is None:
                status = "pending"
            else:
                reasons = reference.differences(identity)
                status = "different" if reasons else "identical"
            own = settings_of(holder.entry)
            replicas.append({
                "server": holder.server, "self": holder.is_self, "server_state": holder.state,
                "identity": identity.to_json() if identity is not None else None,
                "short": identity.short if identity is not None else "pending",
                "status": status, "differences": reasons, "settings": own,
                "settings_differ": sorted(k for k in own if own[k] != settings[k]),
            })
        candidates = [
            r["server"] for r in replicas
            if r["status"] == "identical" and r["server_state"] == "serving"
        ]
        failover = balance.failover_allowed(replica_of(group[0].entry))
        report.append({
            "name": name,
            "reference": reference.to_json() if reference is not None else None,
            "reference_short": reference.short if reference is not None else None,
            "settings": settings,
            "replicas": replicas,
            "failover_candidates": candidates,
            "failover_allowed": failover,
            "high_availability": failover and len(candidates) >= 2,
        })
    return report



def settings_of(entry: co.ReplicaEntry) -> JSON:
    replica = replica_of(entry)
    return {
        "mode": str(replica.mode), "maintenance": replica.maintenance,
        "load_balancing": replica.load_balancing, "fixed_server": replica.fixed_server,
        "subnet_affinity": str(replica.affinity), "shared": replica.shared,
    }
