"""The network boot listener's bounds (pvsd/boot_limits.py) as pure rules, in simulated time:
which connection makes room at a cap, which is refused, when a deadline closes one and whether
that is a timeout, and when each episode begins and ends."""

from __future__ import annotations

import pytest

from pvsd.boot_limits import Admission, BootConnections, EpisodeEnd, Expiry, Scope

TIMEOUT = 10.0


def book(cap: int = 4, per_source: int = 2) -> BootConnections[str]:
    return BootConnections(cap, per_source, TIMEOUT)


def test_under_both_caps_every_connection_is_kept() -> None:
    connections = book()
    assert connections.open("a1", "10.0.0.1", 0) == Admission(True)
    assert connections.open("b1", "10.0.0.2", 0) == Admission(True)
    assert len(connections) == 2 and connections.from_source("10.0.0.1") == 1
    assert connections.pending == 2  # neither has sent a request yet


def test_at_the_source_cap_the_longest_waiting_of_that_source_makes_room() -> None:
    connections = book()
    connections.open("a1", "10.0.0.1", 0)
    connections.open("b1", "10.0.0.2", 1)
    connections.open("a2", "10.0.0.1", 2)
    admission = connections.open("a3", "10.0.0.1", 3)
    assert admission == Admission(True, replaces="a1", scope=Scope.source, cap=2, first=True)
    assert "a1" not in connections and "a3" in connections and "b1" in connections
    again = connections.open("a4", "10.0.0.1", 4)
    assert again.replaces == "a2" and not again.first  # one episode, logged once
    assert connections.close("a1") == []  # replaced: no longer counted, ends nothing
    assert connections.replaced_total == 2


def test_connections_being_answered_are_never_replaced_the_next_is_refused() -> None:
    connections = book()
    for key in ("a1", "a2"):
        connections.open(key, "10.0.0.1", 0)
        connections.request(key)
    refused = connections.open("a3", "10.0.0.1", 1)
    assert refused == Admission(False, scope=Scope.source, cap=2, first=True)
    assert "a3" not in connections and connections.refused_total == 1
    assert connections.close("a3") == []
    assert not connections.open("a4", "10.0.0.1", 2).first
    ended = connections.close("a1")
    assert ended == [EpisodeEnd(Scope.source, 2, 1, "10.0.0.1")]
    assert connections.open("a5", "10.0.0.1", 3) == Admission(True)


def test_at_the_listener_cap_the_longest_waiting_of_any_source_makes_room() -> None:
    connections = book(cap=3, per_source=3)
    connections.open("a1", "10.0.0.1", 0)
    connections.open("b1", "10.0.0.2", 1)
    connections.open("c1", "10.0.0.3", 2)
    connections.request("a1")  # being answered: kept
    connections.answered("a1", 5)  # waiting again, since 5: the newest to wait
    connections.request("b1")
    admission = connections.open("d1", "10.0.0.4", 6)
    assert admission == Admission(True, replaces="c1", scope=Scope.listener, cap=3, first=True)
    admission = connections.open("d2", "10.0.0.4", 7)
    assert admission.replaces == "a1" and not admission.first
    connections.request("d1")
    connections.request("d2")
    assert connections.open("e1", "10.0.0.5", 8) == Admission(
        False, scope=Scope.listener, cap=3
    )
    assert connections.close("b1") == [EpisodeEnd(Scope.listener, 3, 6)]


def test_a_connection_that_sends_nothing_or_part_of_a_request_times_out() -> None:
    connections = book()
    connections.open("idle", "10.0.0.1", 0)
    connections.open("slow", "10.0.0.2", 1)
    connections.received("slow")
    assert connections.deadline("idle") == TIMEOUT
    assert connections.expire("idle", TIMEOUT - 0.001) is None  # a timer a little early
    assert connections.expire("idle", TIMEOUT) == Expiry(timed_out=True, first=True)
    assert connections.expire("slow", 1 + TIMEOUT) == Expiry(timed_out=True, partial=True)
    assert connections.timeouts_total == 2
    assert connections.close("idle") == []  # "slow" still waits: the episode goes on
    assert connections.close("slow") == [EpisodeEnd(Scope.deadline, 2, TIMEOUT)]


def test_a_request_being_answered_has_no_deadline_the_next_one_has() -> None:
    connections = book()
    connections.open("k", "10.0.0.1", 0)
    connections.received("k")
    connections.request("k")
    assert connections.deadline("k") is None and connections.expire("k", 100) is None
    assert connections.pending == 0
    connections.answered("k", 100)
    assert connections.deadline("k") == 100 + TIMEOUT
    # Idle since its answer: a keep-alive connection, closed quietly.
    assert connections.expire("k", 100 + TIMEOUT) == Expiry(timed_out=False)
    assert connections.timeouts_total == 0
    # Part of its next request came: that times out as such.
    connections.received("k")
    assert connections.expire("k", 100 + TIMEOUT) == Expiry(
        timed_out=True, partial=True, first=True
    )


def test_bytes_that_arrive_while_answering_belong_to_the_next_request() -> None:
    connections = book()
    connections.open("p", "10.0.0.1", 0)
    connections.request("p")
    connections.received("p")  # pipelined
    connections.answered("p", 1)
    assert connections.pending == 1
    connections.request("p")  # it was whole
    assert connections.pending == 0


def test_the_timeout_episode_ends_when_none_is_left_waiting_for_a_request() -> None:
    connections = book()
    connections.open("gone", "10.0.0.1", 0)
    connections.open("real", "10.0.0.2", 5)
    assert connections.expire("gone", TIMEOUT) == Expiry(timed_out=True, first=True)
    assert connections.close("gone") == []  # "real" has not sent its request yet
    assert connections.request("real") == EpisodeEnd(Scope.deadline, 1, TIMEOUT)
    connections.open("next", "10.0.0.1", 20)
    assert connections.expire("next", 20 + TIMEOUT) == Expiry(timed_out=True, first=True)


def test_nonsense_bounds_are_refused() -> None:
    for cap, per_source, timeout in ((0, 1, 1.0), (1, 0, 1.0), (1, 1, 0.0)):
        with pytest.raises(ValueError, match="must be positive"):
            BootConnections[str](cap, per_source, timeout)
