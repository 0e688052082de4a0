"""The reply budget of one process, applied: `pvsd.limits.ReplyBudget` says which sessions stop
being read and when an episode begins and ends; this pauses and resumes those sessions and logs
each episode once. pvsd's own sessions have one, and each stream worker one, each with its share
of ``reply_budget`` (`share`), so that the server as a whole holds no more than the setting
whichever process serves the targets that do not read."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

import structlog

from pvsd.limits import BudgetChange, ReplyBudget

log = structlog.get_logger("pvsd.budget")

MIB = 1 << 20


class Holder(Hashable, Protocol):
    """A session whose transport holds replies: it can stop and start reading requests."""

    @property
    def peer(self) -> str: ...

    def budget_pause(self) -> None: ...

    def budget_resume(self) -> None: ...


H = TypeVar("H", bound=Holder)


def share(reply_budget: int, stream_workers: int) -> int:
    """Each process's part of ``reply_budget``: pvsd's and every worker's alike."""
    return max(1, reply_budget // (stream_workers + 1))


class BudgetKeeper(Generic[H]):
    """One process's sessions under ``limit`` bytes of replies not yet sent."""

    def __init__(self, limit: int, max_request: int) -> None:
        # A session is paused once it holds a 64th of the budget (at least 64 KiB, at most one
        # request): the few that hold the most, not a reader between two loop turns.
        floor = min(max_request, max(64 * 1024, limit // 64))
        self.budget: ReplyBudget[H] = ReplyBudget(limit, floor=floor)
        self._since = 0.0

    def unsent(self, holder: H, size: int) -> None:
        """``holder``'s transport holds ``size`` bytes (see ``pvs_protocol.buffers.Lent``)."""
        self._apply(self.budget.report(holder, size))

    def forget(self, holder: H) -> None:
        """``holder``'s connection ended."""
        self._apply(self.budget.forget(holder))

    def _apply(self, change: BudgetChange[H] | None) -> None:
        if change is None:
            return
        budget = self.budget
        for holder in change.pause:
            holder.budget_pause()
        if change.started:
            self._since = time.monotonic()
            top = [f"{holder.peer} {held / MIB:.1f} MiB" for holder, held in budget.top(5)]
            log.warning(
                "reply_budget_exceeded", queued_mib=round(budget.queued / MIB, 1),
                budget_mib=round(budget.limit / MIB, 1), paused=len(change.pause),
                holding_most=top,
                action="targets send requests faster than they read the replies: those "
                "holding the most are not read from until their replies drain. If they are "
                "real targets on slow links, raise reply_budget (memory allowing); if not, "
                "look at the hosts named",
            )
        if change.ended:
            log.info(
                "reply_budget_recovered", queued_mib=round(budget.queued / MIB, 1),
                peak_mib=round(budget.peak / MIB, 1), resumed=len(change.resume),
                seconds=round(time.monotonic() - self._since, 1),
            )
        for holder in change.resume:
            if not budget.is_paused(holder):  # a report made while resuming may pause again
                holder.budget_resume()
