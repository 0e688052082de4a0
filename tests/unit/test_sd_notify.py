"""sd_notify: what is said when (pure), and the datagrams on a real unix socket."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvsd.sd_notify import (
    STARTING_POLL,
    STATUS_POLL,
    Announcer,
    Notifier,
    join_limit,
    pvsd_readiness,
    watchdog_interval,
)


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A service manager's end: a unix datagram socket bound to a short path."""
    directory = tempfile.mkdtemp(prefix="pvs-notify-")
    path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path
    os.unlink(path)
    os.rmdir(directory)


def test_ready_is_said_once_status_when_it_changes_and_the_watchdog_every_interval() -> None:
    announcer = Announcer(watchdog_interval=1.0)
    assert announcer.messages(0.0, False, "joining") == ["STATUS=joining", "WATCHDOG=1"]
    assert announcer.wait(0.0) == STARTING_POLL
    assert announcer.messages(0.1, False, "joining") == []
    assert announcer.messages(0.5, True, "serving") == ["READY=1", "STATUS=serving"]
    assert announcer.wait(0.5) == pytest.approx(0.5)  # the next ping comes before a status look
    assert announcer.messages(1.0, True, "serving") == ["WATCHDOG=1"]
    assert announcer.messages(1.5, True, "serving") == []
    assert announcer.messages(2.0, False, "stopping") == ["STATUS=stopping", "WATCHDOG=1"]
    assert announcer.messages(3.0, True, "serving") == ["STATUS=serving", "WATCHDOG=1"]


def test_readiness_and_status_not_delivered_are_said_again() -> None:
    announcer = Announcer(watchdog_interval=1.0)
    lines = announcer.messages(0.0, True, "serving")
    assert lines == ["READY=1", "STATUS=serving", "WATCHDOG=1"]
    announcer.undelivered(lines)  # the manager's queue was full
    assert announcer.wait(0.0) == STARTING_POLL
    assert announcer.messages(0.1, True, "serving") == ["READY=1", "STATUS=serving"]
    announcer.undelivered(["WATCHDOG=1"])  # a lost ping waits for the next one
    assert announcer.messages(0.2, True, "serving") == []
    assert announcer.messages(1.0, True, "serving") == ["WATCHDOG=1"]


def test_without_a_watchdog_nothing_but_readiness_and_status() -> None:
    announcer = Announcer(watchdog_interval=None)
    assert announcer.messages(0.0, True, "serving") == ["READY=1", "STATUS=serving"]
    assert announcer.wait(0.0) == STATUS_POLL
    assert announcer.messages(100.0, True, "serving") == []


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_half_the_timeout_for_this_process_only(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=42) == expected


def test_pvsd_is_ready_once_it_has_heard_every_peer_or_waited_long_enough() -> None:
    limit = join_limit(heartbeat_interval=0.5, peer_timeout=3.0, inventory_interval=5.0)
    assert limit == 8.5
    common = {"state": "serving", "peers": 2, "targets": 0, "limit": limit}
    assert pvsd_readiness(**common, joined=1, up=2, waited=1.0) == (
        False, "joining the site: heard 1 of 2 peer(s)"
    )
    assert pvsd_readiness(**common, joined=2, up=2, waited=1.0) == (
        True, "serving 0 target(s); 2 of 2 peer(s) up"
    )
    assert pvsd_readiness(**common, joined=1, up=1, waited=8.5) == (
        True, "serving 0 target(s); 1 of 2 peer(s) up"
    )
    alone = pvsd_readiness(state="serving", peers=0, joined=0, up=0, targets=3, waited=0.0,
                           limit=limit)
    assert alone == (True, "serving 3 target(s); no peers")
    stopping = pvsd_readiness(state="stopping", peers=0, joined=0, up=0, targets=3, waited=9,
                              limit=limit)
    assert stopping == (False, "stopping: moving 3 target(s) to other servers")


def test_the_notifier_sends_one_datagram_per_message(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = Notifier.from_environment(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, pid=os.getpid()
    )
    assert notifier is not None and notifier.watchdog_interval == 1.0
    try:
        assert notifier.send("READY=1", "STATUS=serving")
        assert notifier.send("WATCHDOG=1")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        notifier.close()
    assert not notifier.send("WATCHDOG=1")  # closed: nothing, and no error


def test_an_abstract_socket_name_is_understood() -> None:
    name = f"pvs-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier is not None
        try:
            assert notifier.send("READY=1")
            assert sock.recv(4096) == b"READY=1"
        finally:
            notifier.close()


def test_no_socket_no_notifier_and_a_vanished_socket_is_no_error(tmp_path: Path) -> None:
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    notifier = Notifier(str(tmp_path / "gone"))
    try:
        assert not notifier.send("READY=1")
        assert not notifier.send("WATCHDOG=1")
        assert notifier.failures == 2
    finally:
        notifier.close()
