"""The server-wide bounds of pvsd.limits (reply budget, connections per source) as pure rules,
and what ``Lent`` reports of a transport that a peer does not read."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pvs_protocol.buffers import Lent
from pvsd.limits import ReplyBudget, SourceLimit

MIB = 1 << 20


def test_under_the_budget_nothing_happens() -> None:
    budget: ReplyBudget[str] = ReplyBudget(10 * MIB, floor=MIB)
    for name in "abcdefghi":
        assert budget.report(name, MIB) is None
    assert budget.queued == 9 * MIB and not budget.over
    assert budget.report("a", 0) is None
    assert budget.queued == 8 * MIB


def test_passing_the_budget_pauses_those_holding_at_least_the_floor_most_first() -> None:
    budget: ReplyBudget[str] = ReplyBudget(10 * MIB, floor=MIB)
    budget.report("small", MIB // 2)
    budget.report("medium", 3 * MIB)
    change = budget.report("big", 7 * MIB)
    assert change is not None and change.started and not change.ended
    assert change.pause == ("big", "medium")  # the one under the floor is still read
    assert budget.over and budget.episodes == 1 and budget.paused == 2
    assert budget.report("big", 7 * MIB + 1) is None  # once per episode


def test_within_an_episode_a_session_is_paused_when_it_reaches_the_floor() -> None:
    budget: ReplyBudget[str] = ReplyBudget(10 * MIB, floor=MIB)
    budget.report("stalled", 11 * MIB)
    assert budget.report("reader", MIB // 4) is None  # a reader's burst, under the floor
    change = budget.report("another", MIB)
    assert change is not None and change.pause == ("another",) and not change.started
    assert budget.report("another", 2 * MIB) is None  # paused already


def test_a_paused_session_that_drains_is_read_again_before_the_episode_ends() -> None:
    budget: ReplyBudget[str] = ReplyBudget(10 * MIB, floor=MIB)
    budget.report("stalled", 11 * MIB)
    budget.report("slow", 2 * MIB)
    assert budget.report("slow", MIB // 2) is None  # half the floor: still paused
    change = budget.report("slow", MIB // 2 - 1)
    assert change is not None and change.resume == ("slow",) and not change.ended
    assert budget.over


def test_the_episode_ends_under_three_quarters_once_every_paused_session_drained() -> None:
    budget: ReplyBudget[str] = ReplyBudget(8 * MIB, floor=MIB)
    budget.report("a", 5 * MIB)
    started = budget.report("b", 4 * MIB)
    assert started is not None and started.started and set(started.pause) == {"a", "b"}
    assert budget.report("a", 3 * MIB) is None  # 7 MiB: not yet under 6
    assert budget.report("a", 2 * MIB) is None  # 6 MiB, but both still hold their backlog
    resumed = budget.report("a", MIB // 4)
    assert resumed is not None and resumed.resume == ("a",) and not resumed.ended
    change = budget.report("b", MIB // 4)
    assert change is not None and change.ended and change.resume == ("b",)
    assert not budget.over and budget.paused == 0 and budget.peak == 9 * MIB
    again = budget.report("a", 9 * MIB)
    assert again is not None and again.started and budget.episodes == 2


def test_a_target_that_never_reads_keeps_the_episode_open_however_much_the_kernel_takes() -> None:
    """Its socket buffers take part of its backlog: the sum falls under three quarters, but
    it is not read again (it would queue replies anew and start an episode after each)."""
    budget: ReplyBudget[str] = ReplyBudget(8 * MIB, floor=MIB)
    budget.report("stalled", 9 * MIB)
    assert budget.report("stalled", 3 * MIB) is None  # under three quarters, still held
    assert budget.over and budget.is_paused("stalled")
    assert budget.report("reader", 2 * MIB) is None  # 5 MiB: at the floor, but no pressure
    assert not budget.is_paused("reader")
    change = budget.report("reader", 4 * MIB)  # 7 MiB: over three quarters again
    assert change is not None and change.pause == ("reader",) and not change.started
    assert budget.episodes == 1


def test_a_session_that_leaves_gives_back_what_it_held() -> None:
    budget: ReplyBudget[str] = ReplyBudget(8 * MIB, floor=MIB)
    budget.report("gone", 9 * MIB)
    budget.report("other", MIB // 4)
    change = budget.forget("gone")
    assert change is not None and change.ended and change.resume == ()
    assert budget.queued == MIB // 4 and budget.holding("gone") == 0
    assert budget.forget("never seen") is None


def test_the_last_paused_session_leaving_ends_the_episode() -> None:
    budget: ReplyBudget[str] = ReplyBudget(8 * MIB, floor=MIB)
    budget.report("a", 5 * MIB)
    budget.report("b", 4 * MIB)
    assert budget.forget("a") is None  # b still holds 4 MiB unread
    change = budget.forget("b")
    assert change is not None and change.ended and not budget.over


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReplyBudget(0, floor=1)
    with pytest.raises(ValueError, match="at least 1"):
        SourceLimit(0)


def test_at_the_cap_a_new_connection_replaces_the_oldest_not_logged_in() -> None:
    limit: SourceLimit[str] = SourceLimit(3)
    logged_in = {"a1"}
    for name in ("a1", "a2", "a3"):
        assert limit.admit("10.0.0.1", name, logged_in.__contains__).admitted
    assert limit.admit("10.0.0.2", "b1", logged_in.__contains__).admitted  # its own count
    first = limit.admit("10.0.0.1", "a4", logged_in.__contains__)
    assert first.admitted and first.replaces == "a2" and first.first  # a1 is logged in
    second = limit.admit("10.0.0.1", "a5", logged_in.__contains__)
    assert second.replaces == "a3" and not second.first
    assert limit.connections("10.0.0.1") == 3 and limit.replaced_total == 2
    assert limit.left("10.0.0.1", "a2") == 0  # replaced already: not counted
    assert limit.connections("10.0.0.1") == 3


def test_when_all_are_logged_in_the_next_is_refused_and_said_once() -> None:
    limit: SourceLimit[str] = SourceLimit(2)
    always = lambda _name: True  # noqa: E731
    assert limit.admit("10.0.0.1", "a", always).admitted
    assert limit.admit("10.0.0.1", "b", always).admitted
    refused = limit.admit("10.0.0.1", "c", always)
    assert not refused.admitted and refused.first and refused.replaces is None
    again = limit.admit("10.0.0.1", "d", always)
    assert not again.admitted and not again.first
    assert limit.connections("10.0.0.1") == 2 and limit.refused_total == 2
    assert limit.left("10.0.0.1", "a") == 2  # under the cap again: two refused meanwhile
    assert limit.admit("10.0.0.1", "e", always).admitted
    assert limit.admit("10.0.0.1", "f", always).first  # a new episode
    assert limit.left("10.0.0.1", "b") == 1
    assert limit.left("10.0.0.1", "e") == 0
    assert limit.connections("10.0.0.1") == 0


async def test_lent_reports_what_a_transport_holds_while_the_peer_does_not_read() -> None:
    """At each write an upper bound, then the real figure, again while anything is held,
    and zero once the peer has read everything."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    reports: list[int] = []
    try:
        lent = Lent(lambda _buffers: None, transport, loop, unsent=reports.append)
        data = bytes(8 * MIB)
        transport.write(data)
        lent.wrote([data])
        assert reports == [8 * MIB]
        async with asyncio.timeout(10):
            while len(reports) < 2:
                await asyncio.sleep(0.005)
        held = transport.get_write_buffer_size()
        assert 0 < reports[1] <= 8 * MIB and lent.unsent == held
        received = 0
        async with asyncio.timeout(10):
            while received < len(data):
                received += len(await loop.sock_recv(theirs, 1 << 20))
            while reports[-1] != 0:
                await asyncio.sleep(0.005)
        assert lent.unsent == 0
        lent.close()
        assert reports[-1] == 0
    finally:
        transport.close()
        theirs.close()
