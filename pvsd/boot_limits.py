"""Bounds of the network boot listener: the connections it keeps, from one address and in all,
and how long a connection may take to send a whole request.

Pure bookkeeping, the time passed in: `BootConnections` is told what happens to each
connection (opened, bytes received, a request whole, its answer sent, closed) and says what to
do (replace this one, refuse that one, close one whose deadline passed, log an episode);
`pvsd.boot_guard` owns the sockets and the timers.

Why: the listener is plain HTTP open to the machines' subnets. Unbounded, a host could open
thousands of connections and send nothing, or a request one byte a second, and hold a file
descriptor and a parser for each, for ever.

Deadline. A connection must deliver a whole request (line and headers) within
``request_timeout`` of opening, or of the answer to its previous request. Past it, it is
closed: as a timeout (counted, logged) when it had sent nothing yet, or part of a request;
quietly when it is a keep-alive connection that has sent nothing since its answer (iPXE keeps
one for the kernel and the initramfs, asked for right after the script). A connection whose
request is being answered has no deadline: a kernel sent over a slow link takes what it takes.

Caps. At most ``per_source`` connections from one address and ``cap`` in all. One more takes
the place of the connection (of its address, or at the listener's cap of any address) that has
waited longest for a request; only when every one is being answered is it refused. A flood of
idle connections cannot lock a machine out: its request arrives milliseconds after it
connects, and from then on it is not replaced.

Episodes. A cap says when its first refusal or replacement happens and, once a connection
leaves that was not replaced (it is under the cap again), how many there were; the deadline
says when its first timeout happens and, once no connection is left waiting for its first
request or holding part of one, how many timed out. A flood makes two lines, not one a
connection.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Scope(enum.StrEnum):
    """What an episode is about."""

    source = "source"
    """One address at ``per_source``."""
    listener = "listener"
    """The whole listener at ``cap``."""
    deadline = "deadline"
    """Connections closed by the request deadline."""


@dataclasses.dataclass(slots=True)
class _Connection:
    source: str
    since: float
    """When it began to wait for a request: opened, or its last answer sent."""
    busy: bool = False
    """A request of it is whole and its answer not sent yet: no deadline, not replaced."""
    answered: bool = False
    partial: bool = False
    """Bytes arrived since its last request was whole: part of the next one."""

    @property
    def pending(self) -> bool:
        """Waiting for its first request, or holding part of one: it times out as such."""
        return not self.busy and (self.partial or not self.answered)


@dataclasses.dataclass(frozen=True, slots=True)
class Admission(Generic[K]):
    """What to do with a connection that just opened."""

    admitted: bool
    replaces: K | None = None
    """Admitted in the place of this connection, waiting for a request: close it."""
    scope: Scope | None = None
    """The cap it met (``source`` or ``listener``); None: under both."""
    cap: int = 0
    first: bool = False
    """The first refusal or replacement of an episode at that cap: log it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Expiry:
    """A connection's deadline passed: close it."""

    timed_out: bool
    """It had sent nothing yet, or part of a request (False: a keep-alive connection idle
    since its answer, closed quietly)."""
    partial: bool = False
    """It had sent part of a request."""
    first: bool = False
    """The first timeout of an episode: log it."""


@dataclasses.dataclass(frozen=True, slots=True)
class EpisodeEnd:
    """An episode is over: ``count`` connections refused or replaced (``source``,
    ``listener``) or timed out (``deadline``) since ``since``."""

    scope: Scope
    count: int
    since: float
    source: str | None = None


class BootConnections(Generic[K]):
    """The listener's connections, by ``K`` (whatever identifies one to the caller)."""

    def __init__(self, cap: int, per_source: int, request_timeout: float) -> None:
        if cap < 1 or per_source < 1 or not request_timeout > 0:
            raise ValueError("the caps and the request timeout must be positive")
        self.cap = cap
        self.per_source = per_source
        self.request_timeout = request_timeout
        self._open: dict[K, _Connection] = {}
        self._sources: dict[str, int] = {}
        self._waiting: dict[K, None] = {}
        """Connections not busy, by how long they have waited (longest first)."""
        self._pending: set[K] = set()
        self._source_episodes: dict[str, tuple[int, float]] = {}
        """By address at its cap: (refused or replaced, since when)."""
        self._listener_episode: tuple[int, float] | None = None
        self._deadline_episode: tuple[int, float] | None = None
        self.refused_total = 0
        self.replaced_total = 0
        self.timeouts_total = 0

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, key: object) -> bool:
        return key in self._open

    def from_source(self, source: str) -> int:
        return self._sources.get(source, 0)

    @property
    def pending(self) -> int:
        """Connections waiting for their first request or holding part of one."""
        return len(self._pending)

    # -- events -----------------------------------------------------------------------------

    def open(self, key: K, source: str, now: float) -> Admission[K]:
        """A connection from ``source`` was accepted: keep it (maybe in another's place), or
        refuse it (it is not kept)."""
        if self._sources.get(source, 0) >= self.per_source:
            scope, cap = Scope.source, self.per_source
            count, since = self._source_episodes.get(source, (0, now))
            self._source_episodes[source] = (count + 1, since)
            oldest = next((k for k in self._waiting if self._open[k].source == source), None)
        elif len(self._open) >= self.cap:
            scope, cap = Scope.listener, self.cap
            count, since = self._listener_episode or (0, now)
            self._listener_episode = (count + 1, since)
            oldest = next(iter(self._waiting), None)
        else:
            self._add(key, source, now)
            return Admission(True)
        if oldest is None:
            self.refused_total += 1
            return Admission(False, scope=scope, cap=cap, first=count == 0)
        self._remove(oldest)
        self._add(key, source, now)
        self.replaced_total += 1
        return Admission(True, replaces=oldest, scope=scope, cap=cap, first=count == 0)

    def received(self, key: K) -> None:
        """Bytes arrived: part of a request (of the next one, if one is being answered)."""
        connection = self._open.get(key)
        if connection is not None and not connection.partial:
            connection.partial = True
            self._update(key, connection)

    def request(self, key: K) -> EpisodeEnd | None:
        """A request of ``key`` is whole: it is being answered."""
        connection = self._open.get(key)
        if connection is None:
            return None
        connection.busy, connection.partial = True, False
        self._waiting.pop(key, None)
        self._update(key, connection)
        return self._deadline_over()

    def answered(self, key: K, now: float) -> None:
        """The answer is sent: ``key`` waits for its next request, from ``now``."""
        connection = self._open.get(key)
        if connection is None:
            return
        connection.busy, connection.answered, connection.since = False, True, now
        self._waiting.pop(key, None)
        self._waiting[key] = None
        self._update(key, connection)

    def deadline(self, key: K) -> float | None:
        """When ``key`` must have sent a whole request; None: it is being answered (or gone)."""
        connection = self._open.get(key)
        if connection is None or connection.busy:
            return None
        return connection.since + self.request_timeout

    def expire(self, key: K, now: float) -> Expiry | None:
        """``key``'s timer fired: an `Expiry` if its deadline has passed (close it), else
        None (it is being answered, or its deadline moved: see `deadline`)."""
        deadline = self.deadline(key)
        if deadline is None or now < deadline:
            return None
        connection = self._open[key]
        if not connection.pending:
            return Expiry(timed_out=False)
        self.timeouts_total += 1
        count, since = self._deadline_episode or (0, now)
        self._deadline_episode = (count + 1, since)
        return Expiry(timed_out=True, partial=connection.partial, first=count == 0)

    def close(self, key: K) -> list[EpisodeEnd]:
        """``key`` is gone (one replaced or refused is no longer counted): the episodes this
        ends."""
        connection = self._open.get(key)
        if connection is None:
            return []
        self._remove(key)
        ended: list[EpisodeEnd] = []
        source = connection.source
        if source in self._source_episodes:
            count, since = self._source_episodes.pop(source)
            ended.append(EpisodeEnd(Scope.source, count, since, source))
        if self._listener_episode is not None:
            count, since = self._listener_episode
            self._listener_episode = None
            ended.append(EpisodeEnd(Scope.listener, count, since))
        if (deadline := self._deadline_over()) is not None:
            ended.append(deadline)
        return ended

    # -- bookkeeping ------------------------------------------------------------------------

    def _add(self, key: K, source: str, now: float) -> None:
        connection = self._open[key] = _Connection(source, now)
        self._sources[source] = self._sources.get(source, 0) + 1
        self._waiting[key] = None
        self._update(key, connection)

    def _remove(self, key: K) -> None:
        connection = self._open.pop(key)
        left = self._sources[connection.source] - 1
        if left:
            self._sources[connection.source] = left
        else:
            del self._sources[connection.source]
        self._waiting.pop(key, None)
        self._pending.discard(key)

    def _update(self, key: K, connection: _Connection) -> None:
        if connection.pending:
            self._pending.add(key)
        else:
            self._pending.discard(key)

    def _deadline_over(self) -> EpisodeEnd | None:
        if self._deadline_episode is None or self._pending:
            return None
        count, since = self._deadline_episode
        self._deadline_episode = None
        return EpisodeEnd(Scope.deadline, count, since)
