"""Floods that must stay bounded, against a real pvsd on loopback (issue 13, Bounded resources).

- WRITE headers announcing 4 MiB on read-only sessions: each is refused with ERROR READ_ONLY at
  once, and the server allocates nothing for the data it announces (its RSS hardly moves).
- Twenty targets that send READs and never read the replies: the server-wide reply budget
  stops reading them once the replies they hold pass it (logged once), a target that reads
  its replies is still served, and the server's RSS stays near the budget.
- One address opening more stream connections than ``max_connections_per_source``: the one
  past the cap gets GOODBYE BUSY and is closed; other addresses are not affected; the address
  is served again once it holds fewer.

Clients come from several loopback source addresses (127.0.0.2 ...), so that the per-source
cap does not mix into the floods. RSS figures are from /proc/PID/status; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import MIB, Closed, Pvsd, Servers, encoded, frame, make_vdisk, process_memory_kib

from pvs_protocol import events as ev
from pvs_protocol import wire
from pvs_protocol.errors import ErrorCode
from pvs_protocol.wire import FrameType

VDISK = "bounded"
TIMEOUT = 20.0
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


class Target:
    """A target made of a blocking socket bound to a source address of its own; it reads
    only when the test says so, which is how a target that never reads its replies looks."""

    def __init__(self, address: str, source: str, *, receive_buffer: int | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connecting, so that the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(TIMEOUT)
        self.sock.bind((source, 0))
        self.sock.connect((host, int(port)))
        self.request_id = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_event(self, event: ev.Event) -> None:
        self.send(encoded(event))

    def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise Closed(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return bytes(data)

    def read_event(self) -> ev.Event:
        magic, kind, flags, length, request_id = wire.HEADER.unpack(
            self._exactly(wire.HEADER_SIZE)
        )
        assert magic == wire.MAGIC
        payload = self._exactly(length)
        return wire.decode(wire.FrameType(kind), flags, request_id, payload, ev.Checksum.NONE)

    def start(self, max_request: int = 4 * MIB) -> ev.LoginOk:
        self.send_event(ev.Hello(wire.VERSION, wire.VERSION, max_request, frozenset(), "bounds"))
        assert isinstance(self.read_event(), ev.HelloReply)
        self.send_event(ev.Login(f"bounds-{self.sock.getsockname()[1]}", VDISK))
        reply = self.read_event()
        assert isinstance(reply, ev.LoginOk), reply
        return reply

    def next_id(self) -> int:
        self.request_id += 1
        return self.request_id

    def readable(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)


@contextlib.contextmanager
def targets() -> Iterator[list[Target]]:
    made: list[Target] = []
    try:
        yield made
    finally:
        for target in made:
            target.close()


def processes(server: Pvsd) -> list[int]:
    """pvsd and its stream workers (its children), if any."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return [server.pid, *(int(pid) for pid in children)]


def rss_mib(server: Pvsd, field: str = "VmRSS") -> float:
    """Over pvsd and its stream workers: their peaks (VmHWM) are each process's own, so
    their sum bounds what they held at once from above."""
    return sum(process_memory_kib(pid, field) for pid in processes(server)) / 1024


def reset_peak(server: Pvsd) -> float:
    """The RSS now, with the peak (VmHWM) reset to it: from here VmHWM is this test's peak,
    not one from the server's start (hashing its vDisk)."""
    for pid in processes(server):
        with contextlib.suppress(OSError):  # kernels before 4.0: the peak since start remains
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss_mib(server)


def write_toml(path: Path, text: str) -> list[str]:
    path.write_text(text)
    return ["--config", str(path)]


def test_write_headers_announcing_4_mib_on_read_only_sessions_allocate_nothing(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    """100 sessions each send the 24 bytes of a WRITE announcing 4 MiB (header and offset):
    each is refused at once; the server's peak RSS grows by far less than 100 x 4 MiB."""
    store = tmp_path / "store"
    make_vdisk(store, VDISK, 16 * MIB, seed=None)
    server = pvsd_factory("bounds-writes", store, vdisks=[VDISK])
    announced = 4 * MIB
    with targets() as flood:
        for index in range(100):
            flood.append(Target(server.address, SOURCES[index % len(SOURCES)]))
            flood[-1].start(max_request=announced)
        before = reset_peak(server)
        for target in flood:
            header = frame(FrameType.WRITE, struct.pack(">Q", 0), 1, length=announced + 8)
            assert len(header) == 24
            target.send(header)
        for target in flood:
            reply = target.read_event()
            assert isinstance(reply, ev.Error) and reply.request_id == 1, reply
            assert reply.code is ErrorCode.READ_ONLY
        growth = rss_mib(server, "VmHWM") - before
        print(f"\nWRITE flood: RSS {before:.0f} MiB before, peak {before + growth:.0f} MiB "
              f"(+{growth:.1f} MiB for 100 x {announced >> 20} MiB announced)")
        assert growth < 32, f"peak RSS grew {growth:.0f} MiB for data never sent"
        # The refused data, when it does come, is dropped unread and the stream stays in step.
        first = flood[0]
        first.send(bytes(announced))
        read_id = first.next_id() + 1
        first.send_event(ev.Read(read_id, 4096, 4096))
        reply = first.read_event()
        assert isinstance(reply, ev.ReadData) and reply.request_id == read_id, reply
        assert bytes(reply.data) == bytes(4096)
    assert not server.trouble(), server.trouble()


@pytest.mark.parametrize("workers", [0, 2])
def test_targets_that_never_read_their_replies_stay_within_the_reply_budget(
    pvsd_factory: Servers, tmp_path: Path, workers: int
) -> None:
    """20 targets ask 64 MiB each and read nothing. Each target's own transport would hold
    its high-water mark (16 MiB): 320 MiB. With a 32 MiB budget the server stops reading the
    ones that hold the most, says so once (with stream workers: once in each, each with its
    share), and still serves a target that reads."""
    store = tmp_path / "store"
    make_vdisk(store, VDISK, 64 * MIB, seed=None)
    budget_mib = 32
    config = write_toml(
        tmp_path / "pvsd.toml", f"reply_budget = {budget_mib * MIB}\nstream_workers = {workers}\n"
    )
    server = pvsd_factory("bounds-budget", store, vdisks=[VDISK], args=config)
    if workers:
        server.wait_for_log("stream_worker_started", worker=workers)
    with targets() as stalled:
        for index in range(20):
            stalled.append(
                Target(server.address, SOURCES[index % len(SOURCES)], receive_buffer=64 * 1024)
            )
            stalled[-1].start(max_request=MIB)
        before = reset_peak(server)
        for target in stalled:
            target.send(b"".join(
                encoded(ev.Read(target.next_id(), (i % 64) * MIB, MIB)) for i in range(64)
            ))
        for target in stalled:  # a reply began to arrive: its burst of requests was handled
            assert target.readable(TIMEOUT), "no reply at all"
        exceeded = server.wait_for_log("reply_budget_exceeded", timeout=TIMEOUT)
        share = round(budget_mib / (workers + 1), 1)
        assert exceeded["budget_mib"] == share and exceeded["holding_most"]
        # A target that reads its replies is served all along.
        with targets() as readers:
            reader = Target(server.address, "127.0.0.9")
            readers.append(reader)
            reader.start(max_request=MIB)
            for offset in range(0, 8 * MIB, MIB):
                request_id = reader.next_id()
                reader.send_event(ev.Read(request_id, offset, MIB))
                reply = reader.read_event()
                assert isinstance(reply, ev.ReadData) and reply.request_id == request_id
        peak = rss_mib(server, "VmHWM")
        growth = peak - before
        print(f"\n20 targets not reading: RSS {before:.0f} MiB before, peak {peak:.0f} MiB "
              f"(+{growth:.0f} MiB; budget {budget_mib} MiB; without one ~390 MiB)")
        # Beyond the budget: buffers and allocator arenas, and in each worker its own buffer
        # pool (16 MiB). Without the workers' shares of the budget, they grew by ~240 MiB.
        assert growth < budget_mib + 80 + 48 * workers, f"peak RSS grew {growth:.0f} MiB"
    server.wait_for_log("reply_budget_recovered", timeout=TIMEOUT)
    episodes = [line.get("worker") for line in server.find_logs("reply_budget_exceeded")]
    assert sorted(episodes, key=str) == sorted(set(episodes), key=str), episodes
    assert not server.trouble(), server.trouble()


def test_connections_past_the_per_source_cap_are_refused_or_replace_idle_ones(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    """The default cap, 64. With 64 targets of one address logged in, the 65th connection
    gets GOODBYE BUSY and is closed (logged once however many follow); another address is
    served. Once one has left, connections that never log in take turns in the free place
    (each new one replaces the oldest), and a real target still gets in."""
    store = tmp_path / "store"
    make_vdisk(store, VDISK, MIB, seed=None)
    config = write_toml(tmp_path / "pvsd.toml", "handshake_timeout = 120\n")
    server = pvsd_factory("bounds-cap", store, vdisks=[VDISK], args=config)
    hello = encoded(ev.Hello(wire.VERSION, wire.VERSION, MIB, frozenset(), "bounds"))
    source = "127.0.0.6"

    def refused(target: Target) -> None:
        reply = target.read_event()
        assert isinstance(reply, ev.Goodbye) and reply.code == ErrorCode.BUSY, reply
        assert "too many connections" in reply.message
        assert target.sock.recv(1) == b"", "not closed after GOODBYE"

    with targets() as held:
        for _ in range(64):
            held.append(Target(server.address, source))
            held[-1].start(max_request=MIB)
        for _ in range(3):
            over = Target(server.address, source)
            held.append(over)
            refused(over)
        other = Target(server.address, "127.0.0.7")
        held.append(other)
        other.start(max_request=MIB)
        over_cap = server.find_logs("connections_over_cap")
        assert len(over_cap) == 1 and over_cap[0]["source"] == source, over_cap
        assert over_cap[0]["cap"] == 64 and over_cap[0]["refused"] is True
        held.pop(0).close()
        server.wait_for_log("connections_under_cap", timeout=TIMEOUT, source=source,
                            refused_or_replaced=3)
        idle = Target(server.address, source)  # takes the free place, says HELLO, idles
        held.append(idle)
        idle.send(hello)
        assert isinstance(idle.read_event(), ev.HelloReply)
        real = Target(server.address, source)  # replaces the idle one, and logs in
        held.append(real)
        real.start(max_request=MIB)
        refused(idle)
    assert not server.trouble(), server.trouble()
