"""Server-wide bounds on what targets can make pvsd hold: replies written but not yet sent, and
connections from one source address.

Pure bookkeeping, no I/O and no clock: the server feeds it what its sessions report and applies
the verdicts (stop or resume reading a session, refuse a connection), logging them.

Replies. A session stops reading requests while its own transport holds more than its
high-water mark, but twenty targets that send READs and never read the replies still made the
server hold 20 MiB each, with nothing bounding the sum. ``ReplyBudget`` adds the sum: once the
bytes its sessions' transports hold pass ``limit``, every session holding at least ``floor`` of
them is no longer read from (it may send no new requests) until it holds less than half of
that. While the sum stays over three quarters of the limit, any other session reaching the
floor joins them. The episode ends once the sum is under three quarters and every paused
session has drained: a session whose target does not read stays paused however much of its
backlog the kernel's socket buffers take, so that it cannot be read again, queue replies
anew and start an episode after each. Sessions whose targets read their replies hold almost
nothing between two loop turns, so they go on being served: the budget falls on the sessions
that hold the most.

Connections. ``SourceLimit`` counts the stream connections of each source address, at most
``cap``: past it, a new one replaces the oldest of its source still in its handshake, or is
refused when all are past it. It says when a source's first refusal (or replacement) happens
and when the source is back under its cap (with how many meanwhile), so that a flood makes two
log lines, not one a connection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

RESUME_FRACTION = 0.75
"""Within an episode, sessions reaching the floor are paused while the sum is over this
fraction of the budget; it ends once the sum is under it and every paused session drained."""


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetChange(Generic[K]):
    """What to do after a report: stop reading ``pause``, read ``resume`` again."""

    pause: tuple[K, ...] = ()
    resume: tuple[K, ...] = ()
    started: bool = False
    """The sum just passed the budget: an episode begins (log it, once)."""
    ended: bool = False
    """The sum is back under ``RESUME_FRACTION`` of the budget and no session is paused."""


class ReplyBudget(Generic[K]):
    """Bytes of replies written to transports and not yet sent, over all sessions."""

    def __init__(self, limit: int, floor: int) -> None:
        if limit < 1 or floor < 1:
            raise ValueError("the reply budget and its floor must be positive")
        self.limit = limit
        self.floor = floor
        self.low = int(limit * RESUME_FRACTION)
        self.queued = 0
        """The sum of what each holder's transport held when last looked at."""
        self.over = False
        """Within an episode: the sum passed the limit and has not fallen back yet."""
        self.episodes = 0
        self.peak = 0
        """The largest sum seen in the current (or last) episode."""
        self._unsent: dict[K, int] = {}
        self._paused: set[K] = set()

    @property
    def paused(self) -> int:
        return len(self._paused)

    def is_paused(self, holder: K) -> bool:
        return holder in self._paused

    def holding(self, holder: K) -> int:
        return self._unsent.get(holder, 0)

    def top(self, count: int) -> list[tuple[K, int]]:
        """The holders holding the most, most first."""
        return sorted(self._unsent.items(), key=lambda item: -item[1])[:count]

    def report(self, holder: K, unsent: int) -> BudgetChange[K] | None:
        """``holder``'s transport holds ``unsent`` bytes (or at most that many, just after a
        write: they are held until the loop hands them to the kernel, so they count);
        None: nothing to do."""
        old = self._unsent.pop(holder, 0)
        if unsent:
            self._unsent[holder] = unsent
        self.queued += unsent - old
        if not self.over:
            if self.queued <= self.limit:
                return None
            self.over = True
            self.episodes += 1
            self.peak = self.queued
            pause = tuple(h for h, held in self.top(len(self._unsent)) if held >= self.floor)
            self._paused.update(pause)
            return BudgetChange(pause=pause, started=True)
        self.peak = max(self.peak, self.queued)
        resume: tuple[K, ...] = ()
        if holder in self._paused:
            if unsent < self.floor // 2:
                self._paused.discard(holder)
                resume = (holder,)
        elif unsent >= self.floor and self.queued > self.low:
            self._paused.add(holder)
            return BudgetChange(pause=(holder,))
        if self.queued <= self.low and not self._paused:
            self.over = False
            return BudgetChange(resume=resume, ended=True)
        return BudgetChange(resume=resume) if resume else None

    def forget(self, holder: K) -> BudgetChange[K] | None:
        """``holder`` is gone (its connection closed): what it held is no longer held."""
        self._paused.discard(holder)
        return self.report(holder, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Admission(Generic[K]):
    admitted: bool
    replaces: K | None = None
    """Admitted in the place of this connection, the oldest of its source still in its
    handshake: close it."""
    first: bool = False
    """The first refusal or replacement since the source was last under its cap: log it."""


class SourceLimit(Generic[K]):
    """Connections per source address, at most ``cap`` each.

    At the cap, a new connection takes the place of the oldest one of its source that is still
    in its handshake (``settled`` says which are past it): a flood of connections that never
    log in cannot lock out a real target behind the same address, which logs in within
    milliseconds. Only when every connection of the source is past its handshake is the new
    one refused.
    """

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("the connection cap must be at least 1")
        self.cap = cap
        self._holders: dict[str, dict[K, None]] = {}
        """By source: its connections, oldest first."""
        self._dropped: dict[str, int] = {}
        """By source at its cap: connections refused or replaced since it reached it."""
        self.refused_total = 0
        self.replaced_total = 0

    def connections(self, source: str) -> int:
        return len(self._holders.get(source, ()))

    def admit(self, source: str, holder: K, settled: Callable[[K], bool]) -> Admission[K]:
        """A connection from ``source`` arrived: count it (maybe in another's place), or
        refuse it (not counted)."""
        holders = self._holders.setdefault(source, {})
        if len(holders) < self.cap:
            holders[holder] = None
            return Admission(True)
        dropped = self._dropped.get(source, 0) + 1
        self._dropped[source] = dropped
        oldest = next((each for each in holders if not settled(each)), None)
        if oldest is None:
            self.refused_total += 1
            return Admission(False, first=dropped == 1)
        del holders[oldest]
        holders[holder] = None
        self.replaced_total += 1
        return Admission(True, replaces=oldest, first=dropped == 1)

    def left(self, source: str, holder: K) -> int:
        """A connection ended (one replaced is not counted any more). Returns how many were
        refused or replaced since the source reached its cap, once it is under it again."""
        holders = self._holders.get(source)
        if holders is None or holder not in holders:
            return 0
        del holders[holder]
        if not holders:
            del self._holders[source]
        return self._dropped.pop(source, 0)
