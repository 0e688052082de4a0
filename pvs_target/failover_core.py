"""The failover decisions of one vDisk stream, as a pure state machine.

Events and the time come in; actions come out; ``next_timer()`` says when ``tick`` is due.
No clock, socket or task lives here, so every fault (a server that stalls, drips, refuses,
answers keepalives but never reads, or vanishes) is a unit test in simulated time
(tests/unit/test_failover_core.py), and the asyncio supervisor (``pvs_target/failover.py``)
only carries actions out.

Rules, in one place:
- A session is *lost* when its connection ends, when no whole frame arrived from it for
  ``dead_after``, or when its oldest unanswered request is older than the request deadline
  (a server that talks but does not serve is failing this target, whatever else it sends).
- After a loss the target logs in again, pinned, through every server it knows, the lost one
  last and named in AVOID while the site may not have noticed yet; it retries with a delay
  that doubles from ``retry_min`` to ``retry_max``, for ever unless ``give_up_after`` is set.
- The AVOID window lasts ``avoid_for`` at most, and ends as soon as the avoided server is heard
  serving again: a login that lands there. (A SITE or RELOGIN list naming it proves nothing:
  its peers name it until their own peer timeout.) Retry delays count from the start of the
  previous attempt, so a login that already waited out a silent server's connect timeout is
  tried again at once: a frozen server that wakes up is heard within moments, not after a
  back-off.
- Giving up fails what waits, once, with one logged error, and keeps trying at ``retry_max``:
  the stream resumes by itself when a server returns.
- A RELOGIN is a planned move: log in elsewhere while the old session still answers, switch,
  then drain the old one until its deadline. If no other server takes the login before the
  deadline, the old session simply ends and the loss is handled as any other.
- A server found sending data that does not match the manifest is dropped for good.
- Without FAILOVER (load balancing off, Private Image on local storage, maintenance) the
  target only ever logs in again at its one server.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    keepalive_interval: float = 0.5
    """Send a KEEPALIVE after this long without a whole frame from the server."""
    dead_after: float = 1.5
    """No whole frame for this long: the server is gone."""
    request_timeout: float = 0.0
    """A request unanswered this long means the server is failing us; 0: ``dead_after``."""
    connect_timeout: float = 1.0
    """Per login attempt at one server."""
    retry_min: float = 0.05
    retry_max: float = 2.0
    avoid_for: float = 5.0
    """How long a server lost without notice is avoided, unless heard serving sooner."""
    give_up_after: float = 0.0
    """Seconds without a server before requests fail (and fail at once until one returns);
    0 waits for ever."""

    @property
    def deadline(self) -> float:
        return self.request_timeout or self.dead_after


class State(enum.Enum):
    STARTING = "starting"
    STREAMING = "streaming"
    FAILING_OVER = "failing over"
    WAITING = "waiting"
    GAVE_UP = "gave up"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the core needs to know of a session the supervisor opened."""

    key: int
    server_name: str
    address: str
    login_server: str = ""
    failover: bool = True
    """LOGIN_OK carried FAILOVER: the stream may move to another server."""
    site: tuple[str, ...] = ()


# -- actions ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Login:
    """Log in through ``servers`` in order; report with ``logged_in`` or ``login_failed``."""

    attempt: int
    servers: tuple[str, ...]
    avoid: str
    direct: bool
    """At that one server only (REDIRECTED set): a stream without FAILOVER."""
    planned: bool
    """A move asked for by RELOGIN: the old session still serves meanwhile."""
    timeout: float
    """Per server tried."""


@dataclasses.dataclass(frozen=True, slots=True)
class Nudge:
    """Send a KEEPALIVE on ``session``."""

    session: int


@dataclasses.dataclass(frozen=True, slots=True)
class Abandon:
    """Abort ``session``; whatever was in flight on it is sent again on the next one."""

    session: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Switch:
    """Requests go to ``session`` from now on, those waiting for a session too."""

    session: int


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    """Let the old ``session`` answer what it has, until ``until``, then close it."""

    session: int
    until: float


@dataclasses.dataclass(frozen=True, slots=True)
class FailWaiting:
    """Fail every request waiting for a session, and every new one until a ``Switch``."""

    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One failover, for the history and the log."""

    lost_at: float
    from_server: str
    from_address: str
    to_server: str
    to_address: str
    reason: str
    took: float
    """From the last moment the old server was known to serve to the new session: the
    silence before the loss was noticed is included."""
    detected_after: float
    """How long the loss took to notice (the silence, or the age of the stuck request)."""
    in_flight: int
    """Requests in flight on the old session when it was lost."""


@dataclasses.dataclass(frozen=True, slots=True)
class Note:
    """Something for the log: ``event`` at ``level`` with ``fields``."""

    event: str
    level: str
    fields: tuple[tuple[str, Any], ...]


Action = Login | Nudge | Abandon | Switch | Drain | FailWaiting | Record | Note


def _note(event: str, level: str = "info", **fields: Any) -> Note:
    return Note(event, level, tuple(fields.items()))


@dataclasses.dataclass(slots=True)
class _Live:
    """The session requests go to, and what the core last learned of it."""

    info: SessionInfo
    last_heard: float
    last_nudge: float
    oldest_request: float | None = None
    in_flight: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Loss:
    info: SessionInfo
    reason: str
    since: float
    """When the old server was last known to serve."""
    detected_after: float
    in_flight: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Move:
    old: SessionInfo
    reason: str
    since: float
    deadline: float
    first: tuple[str, ...]
    """The servers the RELOGIN named."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Avoid:
    address: str
    name: str
    until: float


class FailoverCore:
    def __init__(self, bootstrap: list[str], settings: Settings | None = None) -> None:
        if not bootstrap:
            raise ValueError("at least one server to log in at")
        self.settings = settings or Settings()
        self.bootstrap = tuple(dict.fromkeys(bootstrap))
        self.known: list[str] = list(self.bootstrap)
        """Every server heard of: the bootstrap list, then what LOGIN_OK, RELOGIN and SITE
        named, in the order learned."""
        self.state = State.STARTING
        self.waiting_reason = ""
        self.dropped: dict[str, str] = {}
        """Servers that sent data not matching the manifest (name -> why): never again."""
        self._dropped_addresses: set[str] = set()
        self.current: _Live | None = None
        self.last: SessionInfo | None = None
        """The latest session, kept while there is none: it says what the stream is."""
        self._avoid: _Avoid | None = None
        self._loss: _Loss | None = None
        self._move: _Move | None = None
        self._attempt = 0
        self._attempt_started = 0.0
        self._login_running = False
        self._retry_at: float | None = None
        self._delay = self.settings.retry_min
        self._without_since: float | None = None
        """Since when requests have had no working session (give-up counts from here)."""
        self._gave_up = False

    # -- queries -----------------------------------------------------------------------------

    @property
    def gave_up(self) -> bool:
        return self._gave_up

    @property
    def session(self) -> int | None:
        return self.current.info.key if self.current is not None else None

    def next_timer(self) -> float | None:
        """When ``tick`` is due next, or None when nothing is timed."""
        settings = self.settings
        times: list[float] = []
        live = self.current
        if live is not None:
            times.append(max(live.last_heard, live.last_nudge) + settings.keepalive_interval)
            times.append(live.last_heard + settings.dead_after)
            if live.oldest_request is not None:
                times.append(live.oldest_request + settings.deadline)
        if self._retry_at is not None:
            times.append(self._retry_at)
        if self._without_since is not None and settings.give_up_after and not self._gave_up:
            times.append(self._without_since + settings.give_up_after)
        return min(times) if times else None

    def snapshot(self) -> dict[str, Any]:
        """What ``pvs-target status`` shows of the decisions."""
        live = self.current
        return {
            "state": self.state.value,
            "waiting_reason": self.waiting_reason,
            "known_servers": list(self.known),
            "avoiding": self._avoid.name if self._avoid is not None else None,
            "dropped": dict(self.dropped),
            "in_flight": live.in_flight if live is not None else 0,
        }

    # -- events ------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Log in for the first time."""
        self._without_since = now
        return self._login(now)

    def heard(self, now: float, session: int) -> None:
        """A whole frame arrived on ``session`` (bytes of a frame not yet whole do not count:
        a server dripping a reply byte by byte is not serving)."""
        live = self.current
        if live is not None and live.info.key == session:
            live.last_heard = max(live.last_heard, now)

    def requests(self, session: int, oldest_sent: float | None, in_flight: int) -> None:
        """When the oldest request unanswered on ``session`` was sent (None: none in flight),
        and how many are in flight. Given before each ``tick``."""
        live = self.current
        if live is not None and live.info.key == session:
            live.oldest_request, live.in_flight = oldest_sent, in_flight

    def logged_in(self, now: float, attempt: int, info: SessionInfo) -> list[Action]:
        if attempt != self._attempt or self.state is State.CLOSED:
            return [Abandon(info.key, "a later login replaced this one")]
        self._login_running = False
        if info.server_name in self.dropped:
            # a login server that has not heard of the damage sent us back there
            self._retry_at = now + self._delay
            self._delay = min(self._delay * 2, self.settings.retry_max)
            return [
                _note("login_on_dropped_server", "warning", server=info.server_name,
                      address=info.address, reason=self.dropped[info.server_name]),
                Abandon(info.key, f"{info.server_name} sent data that fails the manifest"),
            ]
        self._learn((*info.site, info.address, info.login_server))
        if self._avoid is not None and self._avoid.address == info.address:
            self._avoid = None  # heard serving again
        old, move, loss = self.current, self._move, self._loss
        self.current = _Live(info, last_heard=now, last_nudge=now)
        self.last = info
        self.state = State.STREAMING
        self.waiting_reason = ""
        self._retry_at, self._move, self._loss = None, None, None
        self._delay = self.settings.retry_min
        self._without_since = None
        actions: list[Action] = [Switch(info.key)]
        if move is not None and old is not None and old.info.key == move.old.key:
            actions.append(Drain(old.info.key, move.deadline))
            actions.append(Record(move.since, move.old.server_name, move.old.address,
                                  info.server_name, info.address, move.reason,
                                  now - move.since, 0.0, old.in_flight))
        elif loss is not None:
            actions.append(Record(loss.since, loss.info.server_name, loss.info.address,
                                  info.server_name, info.address, loss.reason,
                                  now - loss.since, loss.detected_after, loss.in_flight))
        if self._gave_up:
            self._gave_up = False
            actions.append(_note("resumed", server=info.server_name, address=info.address))
        return actions

    def login_failed(
        self, now: float, attempt: int, message: str, *, retryable: bool = True,
        no_identical: bool = False,
    ) -> list[Action]:
        """The login of ``attempt`` failed at every server it tried."""
        if attempt != self._attempt or self.state is State.CLOSED:
            return []
        self._login_running = False
        move = self._move
        next_try = max(now, self._attempt_started + self._delay)
        if move is not None:
            if next_try >= move.deadline:
                # the old server closes at its deadline; that loss starts the usual path
                self._move = None
                return [_note("relogin_elsewhere_failed", "warning", error=message,
                              action="streaming on until the old server closes")]
            self._retry_at = next_try
            self._delay = min(self._delay * 2, self.settings.retry_max)
            return [_note("relogin_elsewhere_failed", "warning", error=message,
                          retry_in=round(self._retry_at - now, 3))]
        if not retryable and self.last is None:
            self.state = State.CLOSED
            return [FailWaiting(message)]
        self.waiting_reason = self._why(message, no_identical)
        self._retry_at = next_try
        actions: list[Action] = [_note(
            "relogin_failed", "warning", retry_in=round(next_try - now, 3), error=message,
        )]
        self._delay = min(self._delay * 2, self.settings.retry_max)
        return actions + self._check_give_up(now)

    def relogin(
        self, now: float, session: int, deadline_ms: int, site: tuple[str, ...], reason: str
    ) -> list[Action]:
        """The server of ``session`` asked us to move before ``deadline_ms``."""
        live = self.current
        if live is None or live.info.key != session:
            return []
        self._learn(site)
        if not live.info.failover:
            return [_note("relogin_without_failover", reason=reason,
                          action="streaming on; logging in again there once it closes")]
        self._move = _Move(live.info, f"relogin requested: {reason}", now,
                           now + deadline_ms / 1000, site)
        self._retry_at = None
        self._delay = self.settings.retry_min
        return self._login(now)

    def site(self, session: int, site: tuple[str, ...]) -> None:
        """A SITE list arrived on ``session``."""
        live = self.current
        if live is not None and live.info.key == session:
            self._learn(site)

    def drop(self, session: int, reason: str) -> None:
        """``session``'s server sent data that fails the manifest: never use it again for
        this vDisk. (Its loss is reported apart, with ``lost``.)"""
        live, move = self.current, self._move
        info = None
        if live is not None and live.info.key == session:
            info = live.info
        elif move is not None and move.old.key == session:
            info = move.old
        if info is not None:
            self.dropped[info.server_name] = reason
            self._dropped_addresses.add(info.address)

    def lost(
        self, now: float, session: int, reason: str, *, in_flight: int | None = None,
        drop: bool = False, since: float | None = None,
    ) -> list[Action]:
        """``session`` ended or misbehaved; ``drop``: it sent data that fails the manifest;
        ``since``: when the request that failed was sent (a server that answered it with an
        error after stalling was failing us from then on, and ``took`` counts from there)."""
        if drop:
            self.drop(session, reason)
        live = self.current
        if live is None or live.info.key != session:
            return []  # an old session ending after its replacement: nothing is lost
        if in_flight is not None:
            live.in_flight = in_flight
        detected_after = max(0.0, now - since) if since is not None else 0.0
        return self._lose(now, live, reason, detected_after=detected_after)

    def tick(self, now: float) -> list[Action]:
        settings = self.settings
        live = self.current
        actions: list[Action] = []
        if live is not None:
            silent = now - live.last_heard
            stuck = now - live.oldest_request if live.oldest_request is not None else 0.0
            if silent >= settings.dead_after:
                return self._lose(
                    now, live, f"nothing heard from the server for {silent:.1f} s",
                    detected_after=silent,
                )
            if live.oldest_request is not None and stuck >= settings.deadline:
                return self._lose(
                    now, live, f"a request unanswered for {stuck:.1f} s",
                    detected_after=stuck,
                )
            if now - max(live.last_heard, live.last_nudge) >= settings.keepalive_interval:
                live.last_nudge = now
                actions.append(Nudge(live.info.key))
        if self._retry_at is not None and now >= self._retry_at and not self._login_running:
            self._retry_at = None
            actions += self._login(now)
        return actions + self._check_give_up(now)

    def close(self) -> list[Action]:
        self.state = State.CLOSED
        self._retry_at = None
        live, self.current = self.current, None
        return [Abandon(live.info.key, "closing")] if live is not None else []

    # -- inside ------------------------------------------------------------------------------

    def _lose(self, now: float, live: _Live, reason: str, *, detected_after: float) -> list[Action]:
        info = live.info
        self.current = None
        self._move = None
        since = now - detected_after
        self._loss = _Loss(info, reason, since, detected_after, live.in_flight)
        if info.failover:
            self._avoid = _Avoid(info.address, info.server_name, now + self.settings.avoid_for)
        if self._without_since is None:
            self._without_since = since
        self.state = State.FAILING_OVER if info.failover else State.WAITING
        self._delay = self.settings.retry_min
        self._retry_at = None
        actions: list[Action] = [
            _note("server_lost", "warning", server=info.server_name, address=info.address,
                  reason=reason, in_flight=live.in_flight,
                  silent_ms=round(detected_after * 1000, 1)),
            Abandon(info.key, reason),
        ]
        return actions + self._login(now) + self._check_give_up(now)

    def _login(self, now: float) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        servers, avoid, direct = self._plan(now)
        if not servers:
            # every server known sent bad data: none is left to try, nor to learn others from
            self._gave_up = True
            self.state = State.GAVE_UP
            reasons = "; ".join(f"{name}: {why}" for name, why in self.dropped.items())
            self.waiting_reason = f"no other server to read from ({reasons})"
            return [FailWaiting(
                f"every server known sent data that does not match the manifest ({reasons}); "
                "no other server to read from"
            )]
        self._attempt += 1
        self._attempt_started = now
        self._login_running = True
        return [Login(self._attempt, servers, avoid, direct, self._move is not None,
                      self.settings.connect_timeout)]

    def _plan(self, now: float) -> tuple[tuple[str, ...], str, bool]:
        """Where to log in: the site, the server just lost (or moved from) last and named in
        AVOID, dropped servers never; or, without FAILOVER, the one server again."""
        last = self.last
        if last is None:
            return self.bootstrap, "", False
        if not last.failover:  # one server provides it: that one, unless it sent bad data
            if last.address in self._dropped_addresses:
                return (), "", True
            return (last.address,), "", True
        avoid = self._avoid
        if avoid is not None and now >= avoid.until:
            avoid = self._avoid = None
        move = self._move
        tail = []
        if avoid is not None:
            tail.append(avoid.address)  # a silent server costs a connect timeout: try it late
        if move is not None:
            tail.append(move.old.address)  # a stopping server refuses by itself: last
        first = move.first if move is not None else ()
        ordered = [
            s for s in (*first, *self.known)
            if s not in tail and s not in self._dropped_addresses
        ]
        servers = tuple(dict.fromkeys(
            [*ordered, *(s for s in tail if s not in self._dropped_addresses)]
        ))
        if avoid is not None:
            name = avoid.name
        elif move is not None:
            name = move.old.server_name
        else:
            name = next(iter(reversed(self.dropped)), "")
        return servers, name, False

    def _learn(self, addresses: tuple[str, ...]) -> None:
        for address in addresses:
            if address and address not in self.known:
                self.known.append(address)

    def _check_give_up(self, now: float) -> list[Action]:
        limit = self.settings.give_up_after
        since = self._without_since
        if not limit or since is None or self._gave_up or now - since < limit:
            return []
        self._gave_up = True
        self.state = State.GAVE_UP
        message = (
            f"no server could stream it for {now - since:.0f} s "
            f"({self.waiting_reason or 'none answered yet'}); "
            "requests fail until one returns, and the stream resumes by itself then"
        )
        self._delay = self.settings.retry_max
        return [_note("gave_up", "error", seconds=round(now - since, 1),
                      reason=self.waiting_reason or "none answered yet"), FailWaiting(message)]

    def _why(self, message: str, no_identical: bool) -> str:
        last = self.last
        if last is not None and not last.failover:
            return f"no failover: waiting for {last.server_name} at {last.address}"
        if self.dropped and no_identical:
            names = ", ".join(self.dropped)
            return (
                f"every other server lacks an identical replica, and {names} sent data that "
                "fails the manifest: waiting for another one"
            )
        if no_identical:
            return "no serving server holds an identical replica: waiting for one"
        return f"no server answered: {message}"
