"""A connection taken over after login (pvsd's stream workers, `pvsd.workers`): it goes on in
the streaming phase under the same rules, and says when it can change hands; and the request
latencies a worker takes and pvsd adds up."""

from __future__ import annotations

import pytest
from protocol_helpers import HELLO, LOGIN, LOGIN_OK, MAX_IN_FLIGHT, MAX_REQUEST, drain

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.connection import Connection, Phase, Role, negotiate
from pvs_protocol.errors import RemoteProtocolError
from pvsd.metrics import OPS, RequestStats


def logged_in_pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    for sender, receiver, event in (
        (client, server, HELLO),
        (server, client, negotiate(HELLO, max_request=MAX_REQUEST, max_in_flight=MAX_IN_FLIGHT,
                                   server_name="pvs-a")),
        (client, server, LOGIN),
        (server, client, LOGIN_OK),
    ):
        receiver.receive_data(sender.send(event))
        assert drain(receiver) == [event]
    return client, server


def taken_over(server: Connection) -> Connection:
    return Connection.handed_over(
        Role.SERVER, max_request=server.max_request, max_in_flight=server.max_in_flight,
        checksum=server.checksum,
    )


def test_the_worker_answers_where_the_login_left_off() -> None:
    client, server = logged_in_pair()
    assert server.idle
    worker = taken_over(server)
    assert worker.phase is Phase.STREAMING and worker.checksum is ev.Checksum.NONE
    worker.receive_data(client.send(ev.Read(1, 0, 4096)))
    assert drain(worker) == [ev.Read(1, 0, 4096)]
    client.receive_data(worker.send(ev.ReadData(1, b"x" * 4096)))
    assert [bytes(e.data) for e in drain(client) if isinstance(e, ev.ReadData)] == [b"x" * 4096]


def test_the_same_limits_hold_after_the_hand_over() -> None:
    _client, server = logged_in_pair()
    worker = taken_over(server)
    worker.receive_data(b"".join(wire.encode(ev.Read(1, 0, MAX_REQUEST + 4096),
                                             ev.Checksum.NONE)))
    with pytest.raises(RemoteProtocolError, match="outside"):
        drain(worker)


def test_not_idle_while_a_request_is_open_or_bytes_wait() -> None:
    client, server = logged_in_pair()
    frame = client.send(ev.Read(1, 0, 4096))
    server.receive_data(frame[:5])
    assert not server.idle  # half a frame received
    server.receive_data(frame[5:])
    assert drain(server) == [ev.Read(1, 0, 4096)]
    assert not server.idle  # a request open
    server.send(ev.ReadData(1, b"y" * 4096))
    assert server.idle


def test_worker_latencies_add_up_in_pvsd() -> None:
    worker, pvsd = RequestStats(), RequestStats()
    worker.reads(0.0003, 3)
    worker.observe("digests", 0.00002)
    buckets, sums = worker.take()
    pvsd.add(buckets, sums)
    pvsd.add(*worker.take())  # nothing new: adds nothing
    assert sum(pvsd.buckets[OPS.index("read")]) == 3
    assert sum(pvsd.buckets[OPS.index("digests")]) == 1
    assert abs(pvsd.sums[OPS.index("read")] - 0.0009) < 1e-12
    pvsd.add([[1]], [1.0])  # not shaped like a take: ignored
    pvsd.add(buckets, [-1.0] * len(OPS))
    assert sum(pvsd.buckets[OPS.index("read")]) == 3
