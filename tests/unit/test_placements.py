"""Redirects count on their server until its heartbeats show them arrived (pvsd.placements)."""

from __future__ import annotations

from pvsd.placements import Placements


def test_a_redirect_counts_until_the_servers_count_rises() -> None:
    placements = Placements(ttl=2.0)
    placements.heard("s2", 10)
    for _ in range(5):
        placements.placed("s2", 0.0)
    assert placements.pending("s2", 0.1) == 5
    placements.heard("s2", 12)  # two of them arrived before this heartbeat was sent
    assert placements.pending("s2", 0.2) == 3
    placements.heard("s2", 12)  # a heartbeat with no news takes nothing away
    assert placements.pending("s2", 0.3) == 3
    placements.heard("s2", 20)  # more arrivals than we sent: others' redirects
    assert placements.pending("s2", 0.4) == 0


def test_redirects_still_on_their_way_survive_a_heartbeat() -> None:
    """The bug this replaces: every heartbeat forgot every redirect, so in a storm the ones
    still on their way were no longer counted and the next logins went to the same server."""
    placements = Placements(ttl=2.0)
    placements.heard("s2", 0)
    for index in range(100):
        placements.placed("s2", index / 1000)
    placements.heard("s2", 30)
    assert placements.pending("s2", 0.2) == 70


def test_an_old_redirect_stops_counting() -> None:
    placements = Placements(ttl=2.0)
    placements.heard("s2", 0)
    placements.placed("s2", 0.0)
    placements.placed("s2", 1.5)
    assert placements.pending("s2", 2.0) == 2
    assert placements.pending("s2", 2.1) == 1  # the first never arrived
    assert placements.pending("s2", 3.6) == 0


def test_a_fall_or_a_restart_accounts_for_nothing_and_forget_clears() -> None:
    placements = Placements(ttl=2.0)
    placements.heard("s3", 40)
    placements.placed("s3", 0.0)
    placements.heard("s3", 0)  # restarted: its count starts again
    assert placements.pending("s3", 0.1) == 1
    placements.heard("s3", 1)
    assert placements.pending("s3", 0.1) == 0
    placements.placed("s3", 0.2)
    placements.forget("s3")
    assert placements.pending("s3", 0.3) == 0
    assert placements.pending("never-heard", 0.3) == 0


def test_the_first_heartbeat_sets_the_count_without_taking_any() -> None:
    placements = Placements(ttl=2.0)
    placements.placed("s2", 0.0)  # placed on a view from before we kept its count
    placements.heard("s2", 7)
    assert placements.pending("s2", 0.1) == 1
