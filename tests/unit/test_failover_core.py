"""The failover core in simulated time, against scripted servers.

Every fault an administrator reported is a scenario here: a server that answers keepalives but
never reads, one that drips a byte now and then, one that stalls, refuses, vanishes or freezes
and wakes up. ``Sim`` plays the supervisor: it carries the core's actions out against scripted
servers and advances a clock it owns, so a test proves an absence (no failover, no give-up)
over simulated seconds in microseconds of real time.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest

from pvs_target import failover_core as fc

SETTINGS = fc.Settings()


@dataclasses.dataclass
class Server:
    """A scripted server: how it answers a login, and whether it serves once logged in."""

    name: str
    address: str
    accepts: bool = True
    """Refuses logins (an ERROR) when False."""
    reachable: bool = True
    """Connect attempts time out when False (a frozen or cut-off host)."""
    answers_requests: bool = True
    """False: keepalives answered, requests never (stuck)."""
    talks: bool = True
    """False: nothing at all arrives (frozen, cut, or dripping bytes of a frame)."""
    failover: bool = True
    site: tuple[str, ...] = ()
    logins: int = 0


@dataclasses.dataclass
class Sim:
    servers: dict[str, Server]
    bootstrap: list[str]
    settings: fc.Settings = SETTINGS
    now: float = 0.0
    log: list[fc.Action] = dataclasses.field(default_factory=list)
    session: Server | None = None
    sessions: dict[int, Server] = dataclasses.field(default_factory=dict)
    in_flight_since: float | None = None
    """When the oldest request the client sent on the current session went out."""
    failed_waiting: list[str] = dataclasses.field(default_factory=list)
    records: list[fc.Record] = dataclasses.field(default_factory=list)
    logins: list[fc.Login] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.core = fc.FailoverCore(self.bootstrap, self.settings)
        self._keys = itertools.count(1)
        self.apply(self.core.start(self.now))

    # -- the supervisor's part -------------------------------------------------------------

    def apply(self, actions: list[fc.Action]) -> None:
        for action in actions:
            self.log.append(action)
            match action:
                case fc.Login():
                    self.logins.append(action)
                    self._login(action)
                case fc.Switch(session):
                    self.session = self.sessions[session]
                case fc.Abandon(session):
                    if self.session is self.sessions.get(session):
                        self.session = None
                case fc.FailWaiting(message):
                    self.failed_waiting.append(message)
                case fc.Record():
                    self.records.append(action)
                case fc.Nudge() | fc.Drain() | fc.Note():
                    pass

    def _login(self, login: fc.Login) -> None:
        """Try each server in turn; an unreachable one costs the connect timeout."""
        for address in login.servers:
            server = self.servers.get(address)
            if server is None or not server.reachable:
                self.now += login.timeout
                continue
            if not server.accepts:
                continue
            server.logins += 1
            key = next(self._keys)
            self.sessions[key] = server
            self.apply(self.core.logged_in(self.now, login.attempt, fc.SessionInfo(
                key, server.name, server.address, login_server=login.servers[0],
                failover=server.failover, site=server.site,
            )))
            return
        self.apply(self.core.login_failed(self.now, login.attempt, "no server took the login"))

    def run(self, until: float, *, reading: bool = False) -> None:
        """Advance to ``until``, the client keeping a read in flight when ``reading``."""
        while True:
            if reading and self.session is not None and self.in_flight_since is None:
                self.in_flight_since = self.now
            session_key = self.core.session
            server = self.session
            if server is not None and session_key is not None:
                if server.talks:
                    self.core.heard(self.now, session_key)
                if reading and server.answers_requests and server.talks:
                    self.in_flight_since = self.now  # answered at once, next one sent
                self.core.requests(session_key, self.in_flight_since if reading else None,
                                   1 if reading else 0)
            due = self.core.next_timer()
            if due is None or due > until:
                self.now = until
                return
            self.now = max(self.now, due)
            before = self.core.session
            self.apply(self.core.tick(self.now))
            if self.core.session != before:
                self.in_flight_since = None


def site(*servers: Server) -> dict[str, Server]:
    return {server.address: server for server in servers}


A = "10.0.0.1:6910"
B = "10.0.0.2:6910"
C = "10.0.0.3:6910"


def three(**a: object) -> dict[str, Server]:
    return site(Server("a", A, site=(B, C), **a),  # type: ignore[arg-type]
                Server("b", B, site=(A, C)), Server("c", C, site=(A, B)))


def test_first_login_goes_through_the_bootstrap_servers_in_order() -> None:
    servers = three()
    servers[A].reachable = False
    sim = Sim(servers, [A, B])
    assert sim.session is servers[B]
    assert sim.now == SETTINGS.connect_timeout
    assert sim.core.known == [A, B, C]


def test_a_server_that_answers_keepalives_but_never_reads_is_left_at_the_deadline() -> None:
    servers = three(answers_requests=False)
    sim = Sim(servers, [A])
    sim.run(10.0, reading=True)
    assert sim.session is not None and sim.session.name != "a"
    record = sim.records[0]
    assert record.from_server == "a"
    assert "unanswered" in record.reason
    assert record.detected_after == pytest.approx(SETTINGS.deadline)
    assert record.took == pytest.approx(SETTINGS.deadline)  # the wait, not only the login


def test_an_idle_stream_keeps_a_stuck_server_it_does_not_need() -> None:
    servers = three(answers_requests=False)
    sim = Sim(servers, [A])
    sim.run(60.0, reading=False)  # keepalives answered, no request: nothing wrong seen
    assert sim.session is servers[A] and sim.records == []
    assert any(isinstance(action, fc.Nudge) for action in sim.log)


def test_a_silent_server_is_gone_after_dead_after_and_took_counts_the_silence() -> None:
    servers = three()
    sim = Sim(servers, [A])
    sim.run(1.0)
    servers[A].talks = False  # frozen, cut, or dripping bytes that never make a frame
    sim.run(10.0)
    record = sim.records[0]
    assert record.lost_at == pytest.approx(1.0)
    assert record.detected_after == pytest.approx(SETTINGS.dead_after)
    assert record.took == pytest.approx(SETTINGS.dead_after)
    assert sim.session is servers[B]


def test_the_lost_server_is_tried_last_and_named_in_avoid() -> None:
    servers = three()
    sim = Sim(servers, [A])
    servers[A].talks = False
    sim.run(5.0)
    login = sim.logins[-1]
    assert login.servers[-1] == A and login.avoid == "a"


def test_a_site_list_naming_the_lost_server_does_not_end_the_avoid() -> None:
    servers = three()
    sim = Sim(servers, [A])
    servers[A].talks = False
    sim.run(2.0)
    assert sim.session is servers[B]
    sim.core.site(sim.core.session or 0, (A, C))  # B's peers have not noticed A is gone
    sim.apply(sim.core.relogin(sim.now, sim.core.session or 0, 5000, (A, C), "stopping"))
    login = sim.logins[-1]
    assert login.avoid == "a" and login.servers[-2:] == (A, B)
    assert sim.session is servers[C]


def test_a_frozen_last_server_is_used_again_as_soon_as_it_wakes() -> None:
    """The only server freezes for 5 s: back-to-back login attempts (each waits out its
    connect timeout; no back-off gap after it) reach it within one attempt of waking."""
    servers = site(Server("a", A))
    sim = Sim(servers, [A])
    servers[A].talks = servers[A].reachable = False
    sim.run(5.0)
    servers[A].talks = servers[A].reachable = True
    sim.run(5.0 + SETTINGS.connect_timeout + SETTINGS.retry_min + 0.01)
    assert sim.session is servers[A]
    assert sim.records[0].took <= 5.0 + SETTINGS.connect_timeout + SETTINGS.retry_min


def test_after_the_avoid_window_the_lost_server_is_tried_in_turn() -> None:
    servers = site(Server("a", A, site=(B,)), Server("b", B, site=(A,)))
    sim = Sim(servers, [A])
    servers[A].talks = False
    sim.run(2.0)
    sim.run(2.0 + SETTINGS.avoid_for + 1)
    servers[A].talks = True
    servers[B].reachable = servers[B].talks = False
    sim.run(20.0)
    assert sim.session is servers[A]


def test_retries_back_off_and_never_give_up_by_default() -> None:
    servers = three()
    sim = Sim(servers, [A])
    for server in servers.values():
        server.accepts = False
    servers[A].talks = False
    sim.run(3600.0)
    assert sim.failed_waiting == []
    assert sim.core.state is fc.State.FAILING_OVER
    attempts = [login for login in sim.logins[1:]]
    assert len(attempts) < 3600 / SETTINGS.retry_max + 20  # backed off to retry_max


def test_give_up_fails_once_and_the_stream_resumes_by_itself() -> None:
    settings = fc.Settings(give_up_after=3.0)
    servers = three()
    sim = Sim(servers, [A], settings)
    for server in servers.values():
        server.accepts = False
    servers[A].talks = False
    sim.run(600.0)
    assert len(sim.failed_waiting) == 1  # one error, not one per read or per retry
    assert "resumes by itself" in sim.failed_waiting[0]
    assert sim.core.gave_up
    gave_up_notes = [a for a in sim.log if isinstance(a, fc.Note) and a.event == "gave_up"]
    assert len(gave_up_notes) == 1
    servers[C].accepts = True
    sim.run(600.0 + settings.retry_max + 0.1)
    assert sim.session is servers[C] and not sim.core.gave_up
    assert sim.core.state is fc.State.STREAMING


def test_a_relogin_moves_without_waiting_and_drains_the_old_session() -> None:
    servers = three()
    sim = Sim(servers, [A])
    sim.run(1.0)
    old = sim.core.session
    assert old is not None
    sim.apply(sim.core.relogin(sim.now, old, 5000, (C, B), "stopping"))
    assert sim.session is servers[C]  # the RELOGIN list first
    drain = next(a for a in sim.log if isinstance(a, fc.Drain))
    assert drain.session == old and drain.until == pytest.approx(6.0)
    assert sim.records[-1].took == 0.0 and sim.records[-1].reason == "relogin requested: stopping"
    assert sim.logins[-1].servers[-1] == A and sim.logins[-1].avoid == "a"
    assert sim.core.lost(sim.now, old, "closed at its deadline") == []  # nothing lost


def test_a_relogin_nobody_else_takes_keeps_the_old_session_until_it_closes() -> None:
    servers = three()
    sim = Sim(servers, [A])
    servers[B].accepts = servers[C].accepts = False
    servers[A].accepts = False  # stopping: it refuses logins itself
    old = sim.core.session or 0
    sim.apply(sim.core.relogin(sim.now, old, 1000, (B, C), "stopping"))
    sim.run(0.9)
    assert sim.session is servers[A]  # still streaming on the old one
    servers[B].accepts = True
    sim.apply(sim.core.lost(1.0, old, "closed at its deadline"))
    assert sim.session is servers[B]


def test_no_failover_means_the_same_server_only() -> None:
    servers = site(Server("a", A, site=(B,), failover=False), Server("b", B))
    sim = Sim(servers, [A])
    servers[A].talks = False
    servers[A].accepts = False
    sim.run(30.0)
    assert all(login.servers == (A,) and login.direct for login in sim.logins[1:])
    assert sim.core.state is fc.State.WAITING
    assert "no failover" in sim.core.waiting_reason
    servers[A].accepts = servers[A].talks = True
    sim.run(40.0)
    assert sim.session is servers[A]


def test_a_server_that_sent_damaged_data_is_never_used_again() -> None:
    servers = three()
    sim = Sim(servers, [A])
    key = sim.core.session or 0
    sim.apply(sim.core.lost(sim.now, key, "block 7 fails the manifest", drop=True))
    assert sim.session is servers[B]
    servers[B].talks = False
    sim.run(20.0)
    assert sim.session is servers[C]
    assert all(A not in login.servers for login in sim.logins[1:])
    assert sim.core.dropped == {"a": "block 7 fails the manifest"}


def test_a_login_that_lands_on_a_dropped_server_is_left_at_once() -> None:
    servers = site(Server("a", A, site=(B,)), Server("b", B, site=(A,)))
    sim = Sim(servers, [A])
    key = sim.core.session or 0
    servers[B].accepts = False
    # a login server redirects us to A all the same: the core refuses the session
    login = fc.Login(sim.core._attempt + 1, (B,), "a", False, False, 1.0)
    sim.apply(sim.core.lost(sim.now, key, "bad block", drop=True))
    actions = sim.core.logged_in(sim.now, sim.core._attempt, fc.SessionInfo(99, "a", A))
    assert any(isinstance(action, fc.Abandon) and action.session == 99 for action in actions)
    assert not any(isinstance(action, fc.Switch) for action in actions)
    assert login.avoid == "a"


def test_site_updates_teach_servers_started_after_login() -> None:
    servers = three()
    servers["10.0.0.4:6910"] = Server("d", "10.0.0.4:6910")
    sim = Sim(servers, [A])
    sim.core.site(sim.core.session or 0, (B, "10.0.0.4:6910"))
    for address in (A, B, C):
        servers[address].reachable = False
    servers[A].talks = False
    sim.run(30.0)
    assert sim.session is servers["10.0.0.4:6910"]


def test_a_stale_login_result_is_abandoned() -> None:
    sim = Sim(three(), [A])
    actions = sim.core.logged_in(sim.now, 0, fc.SessionInfo(77, "b", B))
    assert actions == [fc.Abandon(77, "a later login replaced this one")]


def test_an_unknown_vdisk_at_the_first_login_ends_the_stream() -> None:
    servers = three()
    core = fc.FailoverCore([A])
    login = core.start(0.0)[0]
    assert isinstance(login, fc.Login)
    actions = core.login_failed(0.0, login.attempt, "no vDisk named x", retryable=False)
    assert actions == [fc.FailWaiting("no vDisk named x")]
    assert core.state is fc.State.CLOSED
    assert servers  # the scripted site is not needed: the core decided alone


@pytest.mark.parametrize("fault", ["stuck", "silent", "refuses-then-vanishes"])
def test_every_loss_is_noticed_within_the_bounds(fault: str) -> None:
    servers = three()
    sim = Sim(servers, [A])
    sim.run(1.0, reading=True)
    changes: dict[str, Callable[[Server], None]] = {
        "stuck": lambda s: setattr(s, "answers_requests", False),
        "silent": lambda s: setattr(s, "talks", False),
        "refuses-then-vanishes": lambda s: (setattr(s, "accepts", False),
                                            setattr(s, "talks", False)),
    }
    changes[fault](servers[A])
    sim.run(30.0, reading=True)
    record = sim.records[0]
    assert record.detected_after <= max(SETTINGS.deadline, SETTINGS.dead_after) + 1e-9
    assert record.took < 2.0  # the bound for everything but a planned stop
