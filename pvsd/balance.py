"""Which server streams a vDisk to a target: a pure function of the site view.

The rules, in the order they apply:
1. Only servers that are up, serving, and hold a replica whose identity is known and that is
   not damaged (content found not to match its manifest) qualify.
2. Load balancing off: only the vDisk's fixed server qualifies (and there is no failover).
3. A target with a pinned identity (it has streamed before) only goes to identical replicas.
   A new target gets the version its device class may have (`wanted_identity`): production
   for ordinary devices, the newest one every serving holder has (a newer one is *pending*
   until then); test devices the newest test version; the maintenance device the maintenance
   version. Of one version, the newest manifest (creation time) wins; how many servers hold it
   only breaks a tie. Copies are not counted as votes: two copies of a damaged or stale image
   must not outvote one good copy of the version the administrator made. A vDisk in
   maintenance goes to its maintenance devices only.
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
from pvs_protocol.modes import Mode, SubnetAffinity, VersionState
from pvsd.versions import DeviceClass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True, slots=True)
class Replica:
    """One server's copy of one version of a vDisk, with the settings stored beside it."""

    identity: ReplicaIdentity | None
    mode: Mode = Mode.standard
    maintenance: bool = False
    """The whole vDisk is under maintenance: only maintenance devices get it."""
    load_balancing: bool = True
    fixed_server: str = ""
    affinity: SubnetAffinity = SubnetAffinity.none
    shared: bool = False
    damaged: bool = False
    """The server found this copy's content not to match its manifest: never a candidate."""
    version: int = 0
    state: VersionState = VersionState.production

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
    replicas: Mapping[str, Mapping[int, Replica]] = dataclasses.field(default_factory=dict)
    """vDisk name -> version -> this server's copy."""

    @property
    def load(self) -> float:
        return self.targets / self.power

    def holds(self, vdisk: str, identity: ReplicaIdentity | None) -> bool:
        """Whether it has a copy it may serve with exactly this identity."""
        if identity is None:
            return False
        replica = self.replicas.get(vdisk, {}).get(identity.version)
        return replica is not None and replica.candidate and replica.identity == identity


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
    if replica.state is VersionState.maintenance:
        return False  # written through by one device, on one server
    return not (replica.mode is Mode.private and not replica.shared)


def settings_for(servers: Sequence[ServerView], vdisk: str, me: str) -> Replica | None:
    """The vDisk's settings: ours if we hold it, else those of the first holder by name
    (each from its newest version: the settings are the vDisk's, not a version's)."""
    holders = sorted(
        (s for s in servers if s.replicas.get(vdisk)), key=lambda s: (s.name != me, s.name)
    )
    if not holders:
        return None
    versions = holders[0].replicas[vdisk]
    return versions[max(versions)]


@dataclasses.dataclass(frozen=True, slots=True)
class VersionStatus:
    """What the site holds of one version of a vDisk."""

    version: int
    state: VersionState
    """The least released state any holder gives it."""
    identity: ReplicaIdentity | None
    """The copy targets get (the newest manifest among good copies on serving servers)."""
    holders: tuple[str, ...]
    """Serving servers with a good copy of that identity."""
    lacking: tuple[str, ...]
    """Serving servers holding the vDisk without a good copy of that identity: while any,
    a production version is pending."""

    @property
    def pending(self) -> bool:
        return bool(self.lacking)


def versions_of(servers: Sequence[ServerView], vdisk: str) -> list[VersionStatus]:
    """Every version of ``vdisk`` the site knows, newest first, with who holds it."""
    serving = [s for s in servers if s.serving and s.replicas.get(vdisk)]
    numbers = sorted({v for s in servers for v in s.replicas.get(vdisk, {})}, reverse=True)
    statuses = []
    for number in numbers:
        copies = [
            (s, s.replicas[vdisk][number]) for s in servers if number in s.replicas.get(vdisk, {})
        ]
        known = [(s, r) for s, r in copies if s.serving] or copies
        state = min((r.state for _s, r in known), key=lambda state: state.rank)
        identity = preferred_identity(r.identity for s, r in copies if s.serving and r.candidate)
        holders = tuple(sorted(s.name for s in serving if s.holds(vdisk, identity)))
        lacking = tuple(sorted(
            s.name for s in serving
            if not s.holds(vdisk, identity) and not _checking(s, vdisk, number)
        ))
        statuses.append(VersionStatus(number, state, identity, holders, lacking))
    return statuses


def _checking(server: ServerView, vdisk: str, version: int) -> bool:
    """A copy still being checked (identity not known yet) does not hold a version back."""
    replica = server.replicas.get(vdisk, {}).get(version)
    return replica is not None and replica.identity is None and not replica.damaged


def wanted_identity(
    servers: Sequence[ServerView], vdisk: str, device: DeviceClass = DeviceClass.ordinary
) -> ReplicaIdentity | None:
    """The version a device that has not streamed before gets.

    Ordinary devices: the newest production version every serving holder of the vDisk has
    (a newer one is *pending* until then); if no version is held everywhere, the newest
    production version at all, so that a site never stops serving a vDisk over a copy it
    lacks. Test devices: the newest test version, else as ordinary devices. The maintenance
    device: the maintenance version, else as a test device.
    """
    statuses = [s for s in versions_of(servers, vdisk) if s.identity is not None]
    if device is DeviceClass.maintenance:
        for status in statuses:
            if status.state is VersionState.maintenance:
                return status.identity
    if device is not DeviceClass.ordinary:
        for status in statuses:
            if status.state is VersionState.test:
                return status.identity
    production = [s for s in statuses if s.state is VersionState.production]
    for status in production:
        if not status.pending:
            return status.identity
    return production[0].identity if production else None


def choose(
    servers: Sequence[ServerView],
    vdisk: str,
    *,
    me: str,
    target_ip: str | None = None,
    pinned: ReplicaIdentity | None = None,
    avoid: str = "",
    device: DeviceClass = DeviceClass.ordinary,
) -> Placement | Refusal:
    settings = settings_for(servers, vdisk, me)
    if settings is None:
        return Refusal(
            ErrorCode.UNKNOWN_VDISK, f"no server of the site holds a vDisk named {vdisk!r}"
        )
    if settings.maintenance and device is not DeviceClass.maintenance:
        return Refusal(
            ErrorCode.NO_IDENTICAL_REPLICA,
            f"{vdisk} is in maintenance: only its maintenance devices get it (pvsctl vdisk set "
            f"{vdisk} --maintenance off gives it back to every target)",
        )
    ready = [s for s in servers if s.serving and _candidates(s, vdisk)]
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
    wanted = pinned if pinned is not None else wanted_identity(ready, vdisk, device)
    if wanted is None:
        return Refusal(
            ErrorCode.NO_IDENTICAL_REPLICA,
            f"no version of {vdisk} may be given to {device} devices now (only versions in "
            "maintenance or test): promote one with pvsctl vdisk version promote",
        )
    identical = [
        s for s in ready
        if s.holds(vdisk, wanted) and (s.name != avoid or not settings.load_balancing)
    ]
    if not identical:
        damaged = any(
            r.damaged and r.identity == wanted
            for s in servers if s.serving for r in s.replicas.get(vdisk, {}).values()
        )
        return Refusal(
            ErrorCode.NO_IDENTICAL_REPLICA,
            f"no serving server holds a replica of {vdisk} identical to the one this target "
            f"streamed ({wanted.short})"
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
    replica = best.replicas[vdisk][wanted.version]
    return Placement(best.name, best.address, wanted, failover_allowed(replica))


def _candidates(server: ServerView, vdisk: str) -> bool:
    return any(r.candidate for r in server.replicas.get(vdisk, {}).values())


def _nothing_ready(servers: Sequence[ServerView], vdisk: str) -> Refusal:
    """Why no serving server can take a target: still hashing (retry), or only damaged copies
    (the administrator must replace them)."""
    held = [
        r for s in servers if s.serving for r in s.replicas.get(vdisk, {}).values()
    ]
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
    """Among copies of one version, the one targets get: the newest manifest.

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
