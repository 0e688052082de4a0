"""Which server streams a vDisk to a target: a pure function of the site view.

The rules, in the order they apply:
1. Only servers that are up, serving, and hold a replica whose identity is known and that is
   not damaged (content found not to match its manifest) qualify.
2. Load balancing off: only the vDisk's fixed server qualifies (and there is no failover).
3. A target with a pinned identity (it has streamed before) only goes to identical replicas.
   A new target goes to the version an administrator made last: the highest version, then the
   newest manifest (creation time); how many servers hold it only breaks a tie of both. Copies
   are not counted as votes: two copies of a damaged or stale image must not outvote one good
   copy of the version the administrator made.
4. Subnet affinity: best effort prefers servers on the target's subnet; fixed allows only them.
5. A server the target names as just lost is skipped (the target names it only for a few
   seconds, until the site has had time to notice; load balancing off ignores it).
6. Least busy wins: targets divided by power rating; ties go to the login server itself (saves
   the target a redirect), then by name, so every server decides the same way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from pvs_protocol.errors import ErrorCode
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode, SubnetAffinity

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, slots=True)
class Replica:
    """One server's copy of a vDisk, with the settings stored beside it."""

    identity: ReplicaIdentity | None
    mode: Mode = Mode.standard
    maintenance: bool = False
    load_balancing: bool = True
    fixed_server: str = ""
    affinity: SubnetAffinity = SubnetAffinity.none
    shared: bool = False
    damaged: bool = False
    """The server found this copy's content not to match its manifest: never a candidate."""

    @property
    def candidate(self) -> bool:
        """Whether this copy may be given to a target at all (placement still picks which)."""
        return self.identity is not None and not self.damaged


@dataclasses.dataclass(frozen=True, slots=True)
class ServerView:
    """A server as the site sees it right now."""

    name: str
    address: str
    serving: bool
    """Up (heard from recently) and in the serving state."""
    power: float = 1.0
    targets: int = 0
    subnets: tuple[Network, ...] = ()
    replicas: Mapping[str, Replica] = dataclasses.field(default_factory=dict)

    @property
    def load(self) -> float:
        return self.targets / self.power


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    server: str
    address: str
    identity: ReplicaIdentity
    failover: bool
    """Whether the target may later move to another identical replica."""


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    code: ErrorCode
    message: str


def failover_allowed(replica: Replica) -> bool:
    """High availability needs a second identical copy the target may move to."""
    if not replica.load_balancing or replica.maintenance:
        return False
    return not (replica.mode is Mode.private and not replica.shared)


def settings_for(servers: Sequence[ServerView], vdisk: str, me: str) -> Replica | None:
    """The vDisk's settings: ours if we hold it, else those of the first holder by name."""
    holders = sorted(
        (s for s in servers if vdisk in s.replicas), key=lambda s: (s.name != me, s.name)
    )
    return holders[0].replicas[vdisk] if holders else None


def choose(
    servers: Sequence[ServerView],
    vdisk: str,
    *,
    me: str,
    target_ip: str | None = None,
    pinned: ReplicaIdentity | None = None,
    avoid: str = "",
) -> Placement | Refusal:
    settings = settings_for(servers, vdisk, me)
    if settings is None:
        return Refusal(
            ErrorCode.UNKNOWN_VDISK, f"no server of the site holds a vDisk named {vdisk!r}"
        )
    ready = [
        s for s in servers if s.serving and vdisk in s.replicas and s.replicas[vdisk].candidate
    ]
    if not settings.load_balancing:
        ready = [s for s in ready if s.name == settings.fixed_server]
        if not ready:
            return Refusal(
                ErrorCode.NO_IDENTICAL_REPLICA,
                f"{vdisk} is served only by {settings.fixed_server or '(no fixed server set)'} "
                "(load balancing off), which cannot serve it now (stopped, still checking its "
                "copy, or its copy is damaged): see pvsctl vdisks, or turn load balancing on",
            )
    if not ready:
        return _nothing_ready(servers, vdisk)
    wanted = pinned if pinned is not None else preferred_identity(
        s.replicas[vdisk].identity for s in ready
    )
    identical = [
        s for s in ready
        if s.replicas[vdisk].identity == wanted and (s.name != avoid or not settings.load_balancing)
    ]
    if not identical:
        damaged = any(
            r.damaged and r.identity == wanted
            for r in (s.replicas.get(vdisk) for s in servers if s.serving) if r is not None
        )
        return Refusal(
            ErrorCode.NO_IDENTICAL_REPLICA,
            f"no serving server holds a replica of {vdisk} identical to the one this target "
            f"streamed ({wanted.short if wanted else '?'})"
            + (" that is not damaged" if damaged else "")
            + "; it waits rather than read other bytes",
        )
    local = on_subnet(identical, target_ip)
    if settings.affinity is SubnetAffinity.fixed:
        if not local:
            return Refusal(
                ErrorCode.NO_IDENTICAL_REPLICA,
                f"{vdisk} has fixed subnet affinity and no server on the subnet of {target_ip} "
                "can serve it",
            )
        identical = local
    elif settings.affinity is SubnetAffinity.best_effort and local:
        identical = local
    best = min(identical, key=lambda s: (s.load, s.name != me, s.name))
    identity = best.replicas[vdisk].identity
    assert identity is not None
    return Placement(best.name, best.address, identity, failover_allowed(settings))


def _nothing_ready(servers: Sequence[ServerView], vdisk: str) -> Refusal:
    """Why no serving server can take a target: still hashing (retry), or only damaged copies
    (the administrator must replace them)."""
    held = [s.replicas[vdisk] for s in servers if s.serving and vdisk in s.replicas]
    if any(r.identity is None and not r.damaged for r in held):
        return Refusal(
            ErrorCode.IDENTITY_PENDING,
            f"no serving server has a verified replica of {vdisk} right now: retry shortly",
        )
    if held:
        return Refusal(
            ErrorCode.NO_IDENTICAL_REPLICA,
            f"every serving replica of {vdisk} is damaged (its content does not match its "
            "manifest): replace it with a good copy (see pvsctl vdisks)",
        )
    return Refusal(
        ErrorCode.NO_IDENTICAL_REPLICA,
        f"no serving server has a verified replica of {vdisk} right now: retry shortly",
    )


def preferred_identity(identities: Iterable[ReplicaIdentity | None]) -> ReplicaIdentity | None:
    """The version a new target gets: the highest version, then the newest manifest.

    The callers pass only copies that are not damaged. How many copies carry an identity only
    breaks a tie of version and creation time (two manifests made in the same nanosecond), so
    that every server still decides the same way.
    """
    counts = Counter(i for i in identities if i is not None)
    if not counts:
        return None
    return max(counts, key=lambda i: (i.version, i.timestamp_ns, counts[i], i.digest))


def on_subnet(servers: Sequence[ServerView], target_ip: str | None) -> list[ServerView]:
    if not target_ip:
        return []
    try:
        address = ipaddress.ip_address(target_ip)
    except ValueError:
        return []
    return [s for s in servers if any(address in net for net in s.subnets)]
