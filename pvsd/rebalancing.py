"""Automatic rebalancing at run time: when to decide, on which view, and carrying a plan out.

The decision is `pvsd.rebalance.plan`, pure. The `Rebalancer` runs it every
``rebalance_interval`` and soon after a peer joins, comes back up or serves again, and carries
the plan out by sending RELOGIN to each target it moves, the planned server first in the list
(the target logs in there, naming this server in AVOID, and placement decides where it lands:
never back here).

It decides only on a settled view: every server decides from the counts it hears in
heartbeats, so a view caught while targets are moving (one counted twice, or not yet) would
give each server another average. It waits until the counts have held still for a few
heartbeats and its own moves are done, for a bounded time, then decides on the view as it is.
It sends the moves in waves (`pvsd.rebalance.next_wave`), each once the view shows the one
before landed, so that placement at each planned server sees the loads the plan saw.

Every move is logged (``rebalance_move``, or ``rebalance_move_skipped`` when its planned server
stops being a place placement would keep it), every plan that moves or says something new
(``rebalance_plan``), and the last plan and the recent moves are kept for the admin API
(``/v1/rebalance``, `pvsd.admin_rebalance`). Only `run` carries plans out, those of
``pvsctl rebalance`` too, so that two rounds never overlap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import time
from collections.abc import Iterable
from typing import Any

import structlog

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.identity import ReplicaIdentity
from pvsd import balance
from pvsd import rebalance as rb
from pvsd.config import Config
from pvsd.server import StreamServer
from pvsd.session import Session

log = structlog.get_logger("pvsd.rebalance")

RECENT_MOVES = 200
"""Moves kept for the API (the log has them all)."""
SETTLE_HEARTBEATS = 2.5
"""The view must hold still this many heartbeat intervals before a decision: every peer's
count has been heard at least twice since the last change."""
JSON = dict[str, Any]


class Busy(Exception):
    """A round is being carried out: a new plan would count its moves twice."""


class Rebalancer:
    """Owned by pvsd's TaskGroup (`run`), which alone carries plans out; `run_now` serves
    ``pvsctl rebalance`` by handing it a plan."""

    def __init__(self, config: Config, server: StreamServer) -> None:
        self.config = config
        self.server = server
        self.settings = rb.Settings(
            trigger_percent=config.rebalance_trigger, boot_window=config.boot_window
        )
        self.runs = 0
        """Decisions carried out (automatic and pvsctl rebalance, not dry runs)."""
        self.moved = 0
        self.last_plan: rb.Plan | None = None
        self.last_reason = ""
        self.recent: collections.deque[JSON] = collections.deque(maxlen=RECENT_MOVES)
        self._told: dict[int, float] = {}
        """Sessions sent a RELOGIN by us -> when (loop time): not planned again while they
        are remembered (ten drain deadlines: one that could not move is tried again then)."""
        self._back: set[str] = set()
        self._queued: rb.Plan | None = None
        self._busy = False
        self._wake = asyncio.Event()
        self._last_verdict = ""

    # -- when -------------------------------------------------------------------------------

    def peer_up(self, name: str) -> None:
        """A server joined, is up again or serves again: decide soon (Site.on_peer_up)."""
        self._back.add(name)
        self._wake.set()

    @property
    def busy(self) -> bool:
        return self._busy or self._queued is not None

    async def run(self) -> None:
        """Decide every interval and soon after a server comes back (unless automatic
        rebalancing is off), and carry out what pvsctl rebalance asks; until cancelled."""
        automatic = self.config.rebalance
        interval = self.config.rebalance_interval
        if automatic:
            log.info("rebalance_on", interval=interval,
                     trigger_percent=self.config.rebalance_trigger,
                     boot_window=self.config.boot_window)
        else:
            log.info("rebalance_off", hint="rebalance = true (or --rebalance on) turns it on; "
                     "pvsctl rebalance runs it once")
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while True:
            timeout = max(0.0, due - loop.time()) if automatic else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            woke = self._wake.is_set()
            self._wake.clear()
            if self._queued is not None:
                plan, self._queued = self._queued, None
                await self._carry_out(plan, "pvsctl rebalance")
            if not automatic:
                continue
            if self._back:
                reason = f"{', '.join(sorted(self._back))} came back"
                self._back = set()
            elif woke:
                continue  # only for pvsctl's plan
            else:
                reason = "interval"
                due += interval
                if due <= loop.time():  # a long wait for a settled view: no catching up
                    due = loop.time() + interval
            await self._settled()
            await self._carry_out(self.decide(), reason)

    async def run_now(self, *, dry_run: bool) -> JSON:
        """pvsctl rebalance: decide now, on the view as it is; unless ``dry_run``, hand the
        plan to `run`, which carries it out. Raises Busy while a round is carried out."""
        if not dry_run and self.busy:
            raise Busy(
                f"{self.config.name} is carrying out a rebalancing round: repeat once it is "
                "done (pvsctl rebalance --status shows it)"
            )
        plan = self.decide()
        if not dry_run:
            self._queued = plan
            self._wake.set()
        return {**self._plan_json(plan, "pvsctl rebalance"), "dry_run": dry_run}

    async def _settled(self) -> None:
        """Wait until the view's counts have held still for a while and none of our own
        moves is under way; at most a bounded time (a busy site never holds still)."""
        loop = asyncio.get_running_loop()
        quiet = SETTLE_HEARTBEATS * self.config.heartbeat_interval
        deadline = loop.time() + self.config.drain_timeout + 4 * quiet
        seen, since = self._counts(), loop.time()
        while loop.time() < deadline:
            if loop.time() - since >= quiet and not self._moving(loop.time()):
                return
            await asyncio.sleep(self.config.heartbeat_interval / 4)
            counts = self._counts()
            if counts != seen:
                seen, since = counts, loop.time()
        log.info("rebalance_view_unsettled", seconds=round(loop.time() - since, 1),
                 hint="targets kept moving: deciding on the view as it is")

    def _counts(self) -> tuple[tuple[str, bool, int], ...]:
        return tuple((s.name, s.serving, s.targets) for s in self.server.view())

    def _moving(self, now: float) -> bool:
        """Whether a target we told to move is still here, within its drain deadline."""
        limit = self.config.drain_timeout + 1.0
        self._told = {k: t for k, t in self._told.items() if now - t < 10 * limit}
        here = {s.session_id for s in self.server.sessions if s.streaming}
        return any(now - t < limit for k, t in self._told.items() if k in here)

    # -- what -------------------------------------------------------------------------------

    def decide(self) -> rb.Plan:
        view = self.server.view()
        servers = [_server(v) for v in view]

        def holders(vdisk: str, identity: ReplicaIdentity | None) -> list[str]:
            return [v.name for v in view if v.holds(vdisk, identity)]

        targets = [
            self._target(session) for session in self.server.sessions
            if session.streaming and session.vdisk is not None
        ]
        return rb.plan(self.config.name, servers, targets, holders, time.time(), self.settings)

    def _target(self, session: Session) -> rb.Target:
        vdisk = session.vdisk
        assert vdisk is not None
        replica = self.server.replica(vdisk)
        movable = (
            balance.failover_allowed(replica) and session.write_fd is None
            and session.session_id not in self._told
        )
        return rb.Target(
            session.session_id, session.device_id, vdisk.name, session.identity,
            session.peer_ip, session.since, session.pinned_login, replica.affinity, movable,
        )

    # -- carrying it out --------------------------------------------------------------------

    async def _carry_out(self, plan: rb.Plan, reason: str) -> None:
        """Log the plan, then send RELOGIN to its targets in waves (`rebalance.next_wave`):
        each wave once the view shows the one before landed."""
        self.runs += 1
        self.last_plan, self.last_reason = plan, reason
        if plan.moves or plan.verdict != self._last_verdict:
            log.info(
                "rebalance_plan", trigger=reason, targets=plan.targets, load=round(plan.load, 2),
                booting=plan.booting, moves=len(plan.moves), verdict=plan.verdict,
                averages={",".join(g.servers): round(g.average, 2) for g in plan.groups},
                expected=dict(plan.expected) or None,
            )
        else:
            log.debug("rebalance_plan", trigger=reason, moves=0, verdict=plan.verdict)
        self._last_verdict = plan.verdict
        if not plan.moves:
            return
        self._busy = True
        try:
            await self._in_waves(list(plan.moves), reason)
        finally:
            self._busy = False

    async def _in_waves(self, pending: list[rb.Move], reason: str) -> None:
        loop = asyncio.get_running_loop()
        beat = self.config.heartbeat_interval
        patience = max(2.0, 8 * beat)  # for its planned server to be the least busy again
        waited_since = loop.time()
        while pending:
            sessions = {s.session_id: s for s in self.server.sessions if s.streaming}
            pending = [m for m in pending if m.session in sessions and m.session not in self._told]
            view = self.server.view()
            wave = rb.next_wave(pending, [_server(v) for v in view])
            for move in wave.drop:
                self._skipped(move, reason, f"{move.to} no longer serves")
            if wave.send:
                arrivals = collections.Counter(m.to for m in wave.send)
                before = {v.name: v.targets for v in view}
                for move in wave.send:
                    self._send(sessions[move.session], move, view, reason)
                sent = {m.session for m in wave.send}
                pending = [m for m in pending if m.session not in sent and m not in wave.drop]
                await self._landed(sent, {n: before.get(n, 0) + k for n, k in arrivals.items()})
                waited_since = loop.time()
                continue
            pending = [m for m in pending if m not in wave.drop]
            if pending and loop.time() - waited_since > patience:
                for move in pending:
                    self._skipped(move, reason, f"{move.to} is no longer among the least busy "
                                  "servers it may go to")
                return
            await asyncio.sleep(beat / 2)

    async def _landed(self, sessions: set[int], expected: dict[str, int]) -> None:
        """Wait (bounded) until the targets told have left and the view shows them at their
        planned servers; at most two heartbeats once they have left (placement may have put
        some elsewhere)."""
        loop = asyncio.get_running_loop()
        beat = self.config.heartbeat_interval
        deadline = loop.time() + self.config.drain_timeout + 2 * beat
        left: float | None = None
        while loop.time() < deadline:
            here = {s.session_id for s in self.server.sessions if s.streaming}
            if not sessions & here:
                left = left if left is not None else loop.time()
                counts = {v.name: v.targets for v in self.server.view()}
                if all(counts.get(n, 0) >= c for n, c in expected.items()):
                    return
                if loop.time() - left >= 2 * beat:
                    return
            await asyncio.sleep(beat / 4)

    def _send(
        self, session: Session, move: rb.Move, view: list[balance.ServerView], reason: str
    ) -> None:
        planned = next(v for v in view if v.name == move.to)
        session.send(ev.Relogin(
            int(self.config.drain_timeout * 1000),
            f"rebalancing: {self.config.name} is above its share; {move.to} is expected to "
            "take it", self._steer(planned, view),
        ))
        self._told[move.session] = asyncio.get_running_loop().time()
        self.moved += 1
        record = {
            "at": _iso(time.time()), "target": move.device, "vdisk": move.vdisk,
            "session": f"{move.session:016x}", "from": self.config.name, "to": move.to,
            "reason": move.reason, "trigger": reason,
        }
        self.recent.append(record)
        log.info(
            "rebalance_move", target=move.device, vdisk=move.vdisk, to=move.to,
            session=record["session"], reason=move.reason, trigger=reason,
            **{"from": self.config.name},
        )

    def _skipped(self, move: rb.Move, reason: str, why: str) -> None:
        log.info(
            "rebalance_move_skipped", target=move.device, vdisk=move.vdisk, to=move.to,
            trigger=reason, why=why, hint="the next round decides again from the view then",
        )

    def _steer(
        self, planned: balance.ServerView, view: Iterable[balance.ServerView]
    ) -> tuple[str, ...]:
        """The RELOGIN's list: the planned server first, then the other serving servers, least
        busy first (a target tries them in this order, and this server last, in AVOID)."""
        others = sorted(
            (v for v in view
             if v.serving and v.name not in (self.config.name, planned.name)),
            key=lambda v: (v.load, v.name),
        )
        addresses = [planned.address, *(v.address for v in others)]
        return tuple(addresses[: wire.MAX_SITE_ADDRESSES])

    # -- what the API shows -----------------------------------------------------------------

    def state(self) -> JSON:
        return {
            "server": self.config.name, "enabled": self.config.rebalance, "busy": self.busy,
            "trigger_percent": self.config.rebalance_trigger,
            "interval": self.config.rebalance_interval, "boot_window": self.config.boot_window,
            "runs": self.runs, "moved": self.moved,
            "last": None if self.last_plan is None else self._plan_json(
                self.last_plan, self.last_reason
            ),
            "recent_moves": list(self.recent),
        }

    def _plan_json(self, plan: rb.Plan, reason: str) -> JSON:
        return {**plan.to_json(), "at": _iso(plan.at), "trigger": reason}


def _server(view: balance.ServerView) -> rb.Server:
    return rb.Server(view.name, view.power, view.serving, view.targets, view.subnets)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")
