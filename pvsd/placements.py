"""Redirects a login server has made that their servers have not counted yet.

Placement compares the target counts peers sent in their last heartbeats. In a boot storm
hundreds of logins arrive between two heartbeats: counted as they were, every one of them
would go to the same stale "least busy" server. So a redirect counts as a target of its
server from the moment it is made until that server's heartbeats show it arrived: a count that
rose by N accounts for the N oldest redirects there. Other login servers' redirects raise the
count too, so ours may stop counting a little early, never late; and one that has not arrived
within ``ttl`` (the target went elsewhere, or gave up) stops counting then.

Forgetting every redirect at the next heartbeat instead, as pvsd did, dropped the ones whose
targets were still on their way: in a storm, most of them.

Pure: the time is passed in.
"""

from __future__ import annotations

import collections


class Placements:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._pending: dict[str, collections.deque[float]] = {}
        self._counted: dict[str, int] = {}
        """Each server's target count in its last heartbeat."""

    def placed(self, server: str, now: float) -> None:
        """A login was just sent to ``server``."""
        self._pending.setdefault(server, collections.deque()).append(now)

    def heard(self, server: str, targets: int) -> None:
        """``server`` says it has ``targets``: the rise since it last said accounts for our
        oldest redirects there (a fall, or a restart, accounts for none)."""
        arrived = targets - self._counted.get(server, targets)
        self._counted[server] = targets
        pending = self._pending.get(server)
        while pending and arrived > 0:
            pending.popleft()
            arrived -= 1

    def pending(self, server: str, now: float) -> int:
        """Redirects to ``server`` not yet in its count, and not older than ``ttl``."""
        pending = self._pending.get(server)
        if not pending:
            return 0
        while pending and now - pending[0] > self.ttl:
            pending.popleft()
        return len(pending)

    def forget(self, server: str) -> None:
        """``server`` went down or was forgotten: whatever was on its way is not there."""
        self._pending.pop(server, None)
        self._counted.pop(server, None)
