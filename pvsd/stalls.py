"""Which stores are not answering: serving I/O in flight per store, as a pure record.

A hung disk or NFS share under a store blocks the worker threads reading from it, and no
timeout in the kernel will free them soon. The server cannot make the store answer, but it
can stop counting on it: a request whose thread has not finished within ``stall_timeout`` is
*overdue*; while a store has an overdue request it is *stalled* (its replicas are not served,
its targets are sent elsewhere), and it recovers when every overdue request of it has finished.
Recovery is known only from those late completions, so no new work needs to be sent to a
stalled store to find out.

No clock, no task and no I/O here: the session arms one timer per offloaded request and calls
`overdue` when it fires, `finished` when the thread returns; the transitions come back as
values, for the server to act upon (logs, RELOGIN, the site). Unit-tested without waiting.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Hashable


class Transition(enum.Enum):
    STALLED = "stalled"
    """The store's first overdue request: stop serving from it."""
    RECOVERED = "recovered"
    """The store's last overdue request finished: serve from it again."""


@dataclasses.dataclass(slots=True)
class _Operation:
    store: Hashable
    overdue: bool = False


class StallTracker:
    """Serving I/O in flight, per store; which stores have overdue requests."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._operations: dict[int, _Operation] = {}
        self._overdue: dict[Hashable, int] = {}

    def started(self, store: Hashable) -> int:
        """A request was handed to a worker thread; returns its token."""
        token = next(self._ids)
        self._operations[token] = _Operation(store)
        return token

    def overdue(self, token: int) -> Transition | None:
        """The request's stall timeout passed and it has not finished. STALLED if it is the
        first overdue request of its store; None if nothing changes (or it finished)."""
        operation = self._operations.get(token)
        if operation is None or operation.overdue:
            return None
        operation.overdue = True
        count = self._overdue.get(operation.store, 0) + 1
        self._overdue[operation.store] = count
        return Transition.STALLED if count == 1 else None

    def finished(self, token: int) -> Transition | None:
        """The request's thread returned (whatever it returned). RECOVERED if it was the last
        overdue request of its store."""
        operation = self._operations.pop(token, None)
        if operation is None or not operation.overdue:
            return None
        count = self._overdue[operation.store] - 1
        if count:
            self._overdue[operation.store] = count
            return None
        del self._overdue[operation.store]
        return Transition.RECOVERED

    def stalled(self, store: Hashable) -> bool:
        return store in self._overdue

    def stalled_stores(self) -> list[Hashable]:
        return list(self._overdue)

    def waiting(self, store: Hashable) -> int:
        """Requests of ``store`` still in worker threads (overdue or not)."""
        return sum(1 for operation in self._operations.values() if operation.store == store)


class StalledStores:
    """One server's view over its processes (pvsd and its stream workers, each with its own
    threads and `StallTracker`): a store is stalled while any of them says so, and recovers
    once none does."""

    def __init__(self) -> None:
        self._found_by: dict[Hashable, set[str]] = {}

    def change(self, store: Hashable, where: str, stalled: bool) -> Transition | None:
        """``where`` (a process) found ``store`` stalled, or answering again: the server's
        transition, if any."""
        before = store in self._found_by
        places = self._found_by.setdefault(store, set())
        (places.add if stalled else places.discard)(where)
        if not places:
            del self._found_by[store]
        after = store in self._found_by
        if after == before:
            return None
        return Transition.STALLED if after else Transition.RECOVERED

    def stalled(self, store: Hashable) -> bool:
        return store in self._found_by

    def found_by(self, store: Hashable) -> list[str]:
        return sorted(self._found_by.get(store, ()))
