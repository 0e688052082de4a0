"""Which of its targets a server tells to log in again elsewhere: a pure function of the site
view, this server's own sessions and the time. No I/O; `pvsd.rebalancing` runs it and carries
the plan out.

The rules, in the order they apply:
1. A server decides only for its own targets, and only while it is serving. It moves nothing
   while it has fewer than 5 targets, or while more than 20% of them are *booting* (logged in
   without a pinned identity, i.e. a fresh boot, less than ``boot_window`` ago): a boot reads
   hard, and moving it would cost more than the imbalance.
2. A target may go only where placement (`pvsd.balance.choose`) would let it log in: a serving
   server holding a copy identical to the one it streams (``holders``), on its subnet if its
   vDisk has subnet affinity and any such server (this one included) is on its subnet. A
   target with best-effort affinity whose only server on its subnet is this one stays: placement
   would send it off its subnet now and back on its next boot. Targets without failover
   (load balancing off, maintenance, a Private Image's writer) never move.
3. The servers a target may be on (those of rule 2 and this one) form its *group*. Every server
   computes the group's average load, targets ÷ power, from the same site view. A group is
   *triggered* when one of its servers with at least 5 targets is more than ``trigger_percent``
   above the average, and the average is at least 5 targets per unit of power.
4. In a triggered group, a server above the average sheds targets, least recently moved first
   (the oldest session here first; one that booted or moved here less than ``boot_window``
   ago never), while it stays at or above the average after each one, and each goes to one of
   the least busy servers of its group (as placement picks; ties by name) while that server
   stays at or below the average after taking it. The plan names that server.
5. The moves are sent in waves (`next_wave`): each to the least busy of its servers as the view
   shows them then, and only while placement there would keep it, each wave once the view
   shows the one before landed. The target is steered there (first in the RELOGIN's list,
   this server in AVOID), and placement decides in the end.

Why nothing moves back and forth (hysteresis):
- The average separates the two sides: a sender never goes below it and a receiver never above
  it (a wave goes only where the view shows room, and placement passes a target that finds a
  server filled meanwhile to the least busy one, never back), so no server both sends and
  receives in one group. After a round on a settled view, senders are at their share rounded
  up and receivers at most one target over theirs, and one target over the share is never
  above a 25% trigger for a server with 5 or more targets. So the next round is not triggered
  and plans nothing: the trigger starts a round, the average ends it.
- Each move goes from a server at or above the average to one at or below it, the sender still
  at least as busy as the receiver afterwards: placement would not send the target straight
  back, and the sum over servers of targets² ÷ power strictly falls with every move (placement
  can only pick a server less busy than the planned one, which lowers it more). That sum takes
  finitely many values while the targets and servers stay the same, so moves cannot cycle.
- Subnet affinity only narrows a target's group to the servers placement would choose for it
  (rule 2), so a moved target is where its next login would put it anyway.
- One round is exact when the site's targets share their groups (one version held by every
  server, or subnets that partition the site). When groups overlap with different averages
  (versions held by different sets of servers, affinity targets beside ones from subnets
  without a server), senders of two groups, each deciding alone, may both fill one server;
  it sheds in a later round, its oldest targets first, never one that arrived within
  ``boot_window``, and by the sum above, never in a cycle.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import SubnetAffinity

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Holders = Callable[[str, ReplicaIdentity | None], Collection[str]]
"""(vDisk, identity) -> names of the servers holding a copy with exactly that identity that
they may serve (known, not damaged); whether they are serving is the caller's view's."""

MIN_TARGETS = 5
"""A server with fewer targets never moves any: a few targets cannot be spread evenly."""
MIN_AVERAGE = 5.0
"""Below this many targets per unit of power on average, nothing is balanced."""
MAX_BOOTING = 0.20
"""A server with a larger share of its targets booting waits until they have booted."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    trigger_percent: float = 25.0
    """A server more than this far above its group's average load starts a round."""
    boot_window: float = 120.0
    """A target that logged in without a pinned identity this recently is booting."""
    min_targets: int = MIN_TARGETS
    min_average: float = MIN_AVERAGE
    max_booting: float = MAX_BOOTING


@dataclasses.dataclass(frozen=True, slots=True)
class Server:
    """A server as the site view shows it."""

    name: str
    power: float
    serving: bool
    targets: int
    subnets: tuple[Network, ...] = ()

    @property
    def load(self) -> float:
        return self.targets / self.power


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One of this server's streaming sessions."""

    session: int
    device: str
    vdisk: str
    identity: ReplicaIdentity | None
    """What it streams: it may go only to identical copies."""
    target_ip: str
    since: float
    """When it logged in here (the clock of ``now``)."""
    pinned: bool
    """It logged in with a pinned identity: it moved here, it did not boot here."""
    affinity: SubnetAffinity = SubnetAffinity.none
    movable: bool = True
    """It may be moved at all: failover allowed, not a writer, not told to move already."""

    def booting(self, now: float, window: float) -> bool:
        return not self.pinned and self.recent(now, window)

    def recent(self, now: float, window: float) -> bool:
        """Booted or moved here within ``window``: left where it is."""
        return now - self.since < window


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """Servers a set of this server's targets may be on, with the average they share."""

    servers: tuple[str, ...]
    average: float
    """Targets per unit of power, over the group's serving servers."""
    trigger: float
    """The load above which a server of the group starts a round."""
    triggered_by: tuple[str, ...]
    targets: int
    """How many of this server's targets belong to it."""

    def to_json(self) -> dict[str, Any]:
        return {
            "servers": list(self.servers), "average": round(self.average, 3),
            "trigger": round(self.trigger, 3), "triggered_by": list(self.triggered_by),
            "targets": self.targets,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Move:
    session: int
    device: str
    vdisk: str
    target_ip: str
    to: str
    """Where placement is expected to put it (the least busy server it may go to)."""
    reason: str
    choices: tuple[str, ...] = ()
    """Every server placement may choose for it (this one excluded)."""
    ceiling: float = 0.0
    """The average of its group: the server it goes to must stay at or below it."""

    def to_json(self) -> dict[str, Any]:
        return {
            "session": f"{self.session:016x}", "target": self.device, "vdisk": self.vdisk,
            "target_ip": self.target_ip, "to": self.to, "reason": self.reason,
            "choices": list(self.choices),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class Wave:
    send: tuple[Move, ...]
    """Moves to send now."""
    drop: tuple[Move, ...]
    """Moves none of whose servers serves any more: the next round decides again."""


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    server: str
    at: float
    targets: int
    load: float
    booting: int
    verdict: str
    """One line saying what the plan does or why it does nothing."""
    groups: tuple[Group, ...] = ()
    moves: tuple[Move, ...] = ()
    expected: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Target counts once the moves are done, as this server expects them."""

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server, "targets": self.targets, "load": round(self.load, 3),
            "booting": self.booting, "verdict": self.verdict,
            "groups": [g.to_json() for g in self.groups],
            "moves": [m.to_json() for m in self.moves], "expected": dict(self.expected),
        }


def plan(
    me: str,
    servers: Sequence[Server],
    targets: Sequence[Target],
    holders: Holders,
    now: float,
    settings: Settings | None = None,
) -> Plan:
    settings = settings or Settings()
    by_name = {s.name: s for s in servers}
    mine = by_name.get(me)
    count = mine.targets if mine is not None else len(targets)
    booting = sum(1 for t in targets if t.booting(now, settings.boot_window))
    if mine is None or not mine.serving:
        return Plan(me, now, count, 0.0, booting, f"{me} is not serving: it moves nothing")
    base = Plan(me, now, count, mine.load, booting, "")
    if count < settings.min_targets:
        return dataclasses.replace(
            base, verdict=f"{count} targets here: fewer than {settings.min_targets} never move"
        )
    if booting > settings.max_booting * count:
        return dataclasses.replace(
            base, verdict=f"{booting} of {count} targets here are booting (more than "
            f"{settings.max_booting:.0%}): nothing moves until they have booted",
        )
    routes = {t.session: _receivers(t, mine, by_name, holders) for t in targets if t.movable}
    keys = {
        session: frozenset((*receivers, me)) for session, receivers in routes.items() if receivers
    }
    groups = {
        key: _group(key, by_name, settings, sum(1 for k in keys.values() if k == key))
        for key in sorted(set(keys.values()), key=sorted)
    }
    if not groups:
        return dataclasses.replace(
            base, verdict="no target here may move: none has another server it may stream from "
            "(identical copy, subnet affinity, failover allowed)",
        )
    projected = {s.name: s.targets for s in servers}
    moves: list[Move] = []
    candidates = sorted(
        (t for t in targets if t.session in keys and not t.recent(now, settings.boot_window)),
        key=lambda t: (t.since, t.session),
    )
    for target in candidates:
        group = groups[keys[target.session]]
        if not group.triggered_by:
            continue
        if (projected[me] - 1) / mine.power < group.average:
            continue  # at its share for this group: it would drop below the average
        to = _receiver(routes[target.session], projected, by_name, group.average)
        if to is None:
            continue  # the least busy one would go above the average: nowhere to go
        projected[me] -= 1
        projected[to] += 1
        moves.append(Move(
            target.session, target.device, target.vdisk, target.target_ip, to,
            f"{me} has load {mine.load:.2f}, above the average {group.average:.2f} of the "
            f"servers that may serve it ({', '.join(group.servers)}), where "
            f"{', '.join(group.triggered_by)} passed {group.trigger:.2f}",
            routes[target.session], group.average,
        ))
    summary = tuple(groups.values())
    verdict = _verdict(me, mine, summary, moves, settings)
    return dataclasses.replace(
        base, verdict=verdict, groups=summary, moves=tuple(moves),
        expected={n: c for n, c in sorted(projected.items())} if moves else {},
    )


def next_wave(pending: Sequence[Move], servers: Sequence[Server]) -> Wave:
    """Which planned moves to send now, and where, given the view as it is.

    Each goes to the least busy of its servers, counting the moves of this wave sent there
    before it (ties by name), if that server stays at or below the average after taking it,
    and only while it is no busier than any other of them as the view shows them now: the
    servers see each other's counts a heartbeat late, so placement there keeps the target
    only if it is no busier than what it sees of the others (a tie goes to the server a login
    arrives at). Moves sent all at once would be passed on to whichever server only looks less
    busy; several servers shedding at once would each count on the same room. The others wait
    until the view shows the earlier ones landed (the caller waits, for a bounded time: room
    taken by another server's targets is not waited for).
    """
    by_name = {s.name: s for s in servers}
    sent: dict[str, int] = {}
    send: list[Move] = []
    drop: list[Move] = []
    for move in pending:
        serving = [name for name in move.choices if name in by_name and by_name[name].serving]
        if not serving:
            drop.append(move)
            continue
        seen = {name: by_name[name].load for name in serving}  # until the view shows the wave
        loads = {n: (by_name[n].targets + sent.get(n, 0)) / by_name[n].power for n in serving}
        least = min(loads.values())
        fits = [
            name for name in serving
            if loads[name] == least
            and (by_name[name].targets + sent.get(name, 0) + 1) / by_name[name].power
            <= move.ceiling
            and all(loads[name] <= seen[other] for other in serving if other != name)
        ]
        if fits:
            to = min(fits)
            send.append(dataclasses.replace(move, to=to))
            sent[to] = sent.get(to, 0) + 1
    return Wave(tuple(send), tuple(drop))


def _receivers(
    target: Target, mine: Server, by_name: Mapping[str, Server], holders: Holders
) -> tuple[str, ...]:
    """The servers placement could send ``target`` to if it left this one, sorted by name."""
    pool = [
        s for name in holders(target.vdisk, target.identity)
        if (s := by_name.get(name)) is not None and s.serving and s.name != mine.name
    ]
    if target.affinity is not SubnetAffinity.none:
        local = [s for s in pool if _on_subnet(s, target.target_ip)]
        if local or _on_subnet(mine, target.target_ip) or target.affinity is SubnetAffinity.fixed:
            pool = local
    return tuple(sorted(s.name for s in pool))


def _receiver(
    names: Sequence[str], projected: Mapping[str, int], by_name: Mapping[str, Server],
    average: float,
) -> str | None:
    """The server the target is steered to: one of the least busy (placement keeps a login
    at the server it arrives at on a tie, and sends it to any less busy one), that stays at or
    below the average after taking it; the first such by name."""
    loads = {name: projected[name] / by_name[name].power for name in names}
    least = min(loads.values())
    fits = [
        name for name in names
        if loads[name] == least and (projected[name] + 1) / by_name[name].power <= average
    ]
    return min(fits) if fits else None


def _on_subnet(server: Server, target_ip: str) -> bool:
    try:
        address = ipaddress.ip_address(target_ip)
    except ValueError:
        return False
    return any(address in network for network in server.subnets)


def _group(
    key: frozenset[str], by_name: Mapping[str, Server], settings: Settings, targets: int
) -> Group:
    members = [by_name[name] for name in sorted(key)]
    average = sum(s.targets for s in members) / sum(s.power for s in members)
    line = average * (1 + settings.trigger_percent / 100)
    triggered = () if average < settings.min_average else tuple(
        s.name for s in members if s.targets >= settings.min_targets and s.load > line
    )
    return Group(tuple(s.name for s in members), average, line, triggered, targets)


def _verdict(
    me: str, mine: Server, groups: Sequence[Group], moves: Sequence[Move], settings: Settings
) -> str:
    if moves:
        where = sorted({m.to for m in moves})
        return f"moving {len(moves)} targets from {me} to {', '.join(where)}"
    if not any(g.triggered_by for g in groups):
        if all(g.average < settings.min_average for g in groups):
            return (
                f"balanced: fewer than {settings.min_average:g} targets per unit of power on "
                "average, too few to move"
            )
        return (
            f"balanced: no server is more than {settings.trigger_percent:g}% above the average "
            "of the servers its targets may use"
        )
    if all(mine.load < g.average + 1 / mine.power for g in groups if g.triggered_by):
        return f"{me} is at its share; the servers above it move their own targets"
    return f"{me} is above its share, but no server its targets may go to is below the average"
