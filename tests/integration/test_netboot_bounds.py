"""The network boot listener under floods, against a real pvsd on loopback (`pvsd.boot_guard`).

- 400 idle TCP connections (more than ``boot_max_connections``, 256): pvsd keeps at most the
  cap, newer ones replacing the oldest that have sent nothing, so its descriptor count
  (/proc/PID/fd) stays bounded; meanwhile a machine still gets its scripts and its kernel;
  once the flood ends, the descriptors are released. Logged once, not once a connection.
- A client sending a request one byte at a time, and idle connections beside it, are closed
  at the request deadline (``boot_request_timeout``): the slow one is answered 408, one
  warning says so for all of them, and one line counts them once none is left waiting. An
  idle keep-alive connection is closed at the deadline too, without a warning.
- A request line over 4 KiB, or TLS (an https:// URL), is refused (400) and logged once as
  such, without a traceback.
- The per-address cap (``max_connections_per_source``): connections whose requests are being
  answered (kernels sent to machines that read slowly) are never replaced; the next one from
  their address is refused at once (503, one line); at the listener's cap a real request
  takes the place of an idle connection of another address.

Flood connections come from loopback source addresses of their own (127.0.0.2 ...); every
wait is bounded, and no assertion depends on how long pvsd took.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import Pvsd, Servers, make_vdisk
from test_netboot import KERNEL, MAC, boot_address, boot_files, http

MIB = 1 << 20
FLOOD = 400
CAP = 256
"""``boot_max_connections``' default."""
BACKLOG = 128
"""The listening socket's backlog: accepted in one burst, before the replaced ones close."""
SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 9))
WAIT = 30.0


class Client:
    """A raw TCP connection from a source address of its own; it reads only when asked."""

    def __init__(self, address: str, source: str, *, receive_buffer: int | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connecting, so that the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.bind((source, 0))
        self.sock.settimeout(WAIT)
        self.sock.connect((host, int(port)))
        self.received = b""
        self.closed = False

    def send(self, data: bytes) -> bool:
        """Send; False once the server has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def ended(self) -> bool:
        """Whether the server has closed (or reset) it; keeps what it sent."""
        if self.closed:
            return True
        self.sock.setblocking(False)
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self.closed = True
        except BlockingIOError:
            pass
        except ConnectionError:
            self.closed = True
        finally:
            self.sock.setblocking(True)
        return self.closed

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    try:
        yield made
    finally:
        for client in made:
            client.close()


def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def fds(server: Pvsd) -> int:
    return len(os.listdir(f"/proc/{server.pid}/fd"))


def started(pvsd_factory: Servers, tmp_path: Path, *args: str) -> tuple[Pvsd, str]:
    store = tmp_path / "store"
    make_vdisk(store, "deb", 4 * MIB, seed=5)
    boot_files(store, "deb")
    server = pvsd_factory("nb", store, start=False, args=["--admin", "off", *args])
    address = boot_address(server)
    server.start(vdisks=["deb"])
    server.wait_for_log("boot_listening", address=address)
    return server, address


def request(path: str, *, close: bool = True) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: boot\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()


def test_a_flood_of_idle_connections_is_capped_while_a_machine_boots(
    pvsd_factory: Servers, tmp_path: Path, clients: list[Client]
) -> None:
    server, boot = started(pvsd_factory, tmp_path)
    before = most = fds(server)
    for index in range(FLOOD):
        clients.append(Client(boot, SOURCES[index % len(SOURCES)]))
        if index % 50 == 49:
            most = max(most, fds(server))
    # A machine boots meanwhile: each request a new connection, in the place of an idle one.
    chain = http(f"http://{boot}/boot/deb.ipxe")
    script = http(f"http://{boot}/boot/deb.ipxe?device={MAC}")
    kernel = http(f"http://{boot}/boot/deb/1/vmlinuz")
    most = max(most, fds(server))
    assert chain.status == 200 and "chain http://" in chain.text, chain.text
    assert script.status == 200 and f"pvs.device={MAC}" in script.text, script.text
    assert kernel.status == 200 and kernel.body == KERNEL
    until(lambda: sum(client.ended() for client in clients) >= FLOOD - CAP,
          "the idle connections past the cap to be closed")
    most = max(most, fds(server))
    dropped = sum(client.ended() for client in clients)
    during = fds(server)
    print(f"\n{FLOOD} idle boot connections: pvsd had {before} fds before, at most {most} "
          f"during the flood ({during} once settled); {dropped} connections closed by pvsd")
    # The cap, and at most one burst of accepts (the backlog) whose replaced sockets close on
    # the next loop turn; not one descriptor per flooding connection.
    assert most <= before + CAP + BACKLOG + 16, f"{most} fds (from {before})"
    assert during <= before + CAP + 8, f"{during} fds (from {before})"
    over = server.find_logs("boot_connections_over_cap")
    assert len(over) == 1 and over[0]["scope"] == "listener" and over[0]["cap"] == CAP, over
    assert over[0]["refused"] is False
    for client in clients:
        client.close()
    until(lambda: fds(server) <= before + 2, "the descriptors to be released")
    after = fds(server)
    print(f"after the flood: {after} fds")
    ended = server.wait_for_log("boot_connections_under_cap", scope="listener")
    assert ended["refused_or_replaced"] >= FLOOD - CAP, ended
    assert not server.find_logs("boot_request_timeout")  # none waited 10 s
    assert not server.trouble(), server.trouble()


def test_slow_and_idle_connections_are_closed_at_the_request_deadline(
    pvsd_factory: Servers, tmp_path: Path, clients: list[Client]
) -> None:
    server, boot = started(pvsd_factory, tmp_path, "--boot-request-timeout", "2")
    # An idle keep-alive connection: answered, then closed at the deadline without a word.
    keepalive = Client(boot, "127.0.0.2")
    clients.append(keepalive)
    assert keepalive.send(request("/boot/deb.ipxe", close=False))
    until(lambda: keepalive.ended(), "the idle keep-alive connection to be closed")
    assert keepalive.received.startswith(b"HTTP/1.1 200 OK\r\n"), keepalive.received
    assert keepalive.received.endswith(b"?device=${mac:hexhyp}\n"), keepalive.received
    assert not server.find_logs("boot_request_timeout")
    # A request one byte at a time, and 20 connections that send nothing.
    slow = Client(boot, "127.0.0.3")
    idle = [Client(boot, "127.0.0.4") for _ in range(20)]
    clients += [slow, *idle]
    sent = 0
    for byte in request("/boot/deb.ipxe")[:-2]:  # never whole
        if slow.ended() or not slow.send(bytes([byte])):
            break
        sent += 1
        time.sleep(0.2)
    until(slow.ended, "the slow client to be closed")
    assert slow.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), slow.received
    assert slow.received.endswith(b"\r\n\r\nno whole request in 2 s: closed\n"), slow.received
    until(lambda: all(client.ended() for client in idle), "the idle connections to be closed")
    ended = server.wait_for_log("boot_request_timeouts_ended")
    warned = server.find_logs("boot_request_timeout")
    print(f"\nslow client closed after {sent} bytes; {len(warned)} warning for "
          f"{ended['timed_out']} connections timed out")
    assert ended["timed_out"] == 21, ended
    assert len(warned) == 1 and warned[0]["seconds"] == 2, warned
    assert warned[0]["client"] in ("127.0.0.3", "127.0.0.4")
    assert not server.find_logs("boot_request_refused")  # a timeout is not a request
    # The listener serves on; a request line over 4 KiB, or TLS (an https:// URL), is refused.
    assert http(f"http://{boot}/boot/deb.ipxe").status == 200
    for data, said in ((request("/boot/" + "a" * 5000), "Got more than 4096 bytes"),
                       (b"\x16\x03\x01 hello\r\n\r\n", "Received HTTPS traffic")):
        odd = Client(boot, "127.0.0.5")
        clients.append(odd)
        assert odd.send(data)
        until(odd.ended, "the unreadable request to be answered")
        assert odd.received.startswith(b"HTTP/1.0 400 Bad Request\r\n"), odd.received
        assert server.wait_for_log("boot_request_refused", status=400,
                                   error=lambda text, said=said: text.startswith(said))
    assert not server.trouble(), server.trouble()  # no traceback


def test_connections_being_answered_are_kept_and_the_next_one_refused(
    pvsd_factory: Servers, tmp_path: Path, clients: list[Client]
) -> None:
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the sockets' buffers hold
    server, boot = started(
        pvsd_factory, tmp_path, "--max-connections-per-source", "2",
        "--boot-max-connections", "3",
    )
    (tmp_path / "store" / "deb.initrd").write_bytes(big)
    # Two machines of one address being sent an initramfs they read slowly (not at all).
    readers = [Client(boot, "127.0.0.2", receive_buffer=4096) for _ in range(2)]
    clients += readers
    for reader in readers:
        assert reader.send(request("/boot/deb/1/initrd"))
    until(lambda: all(reader.sock.recv(1, socket.MSG_PEEK) for reader in readers),
          "the initramfs to start arriving")
    refused = Client(boot, "127.0.0.2")
    clients.append(refused)
    until(refused.ended, "the connection past the address's cap to be closed")
    assert refused.received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert refused.received.endswith(
        b"too many connections from 127.0.0.2 to this boot listener: try again in a moment\n"
    )
    over = server.wait_for_log("boot_connections_over_cap", scope="source")
    assert over["client"] == "127.0.0.2" and over["cap"] == 2 and over["refused"] is True
    # At the listener's cap (3), a real request takes the place of an idle connection.
    idle = Client(boot, "127.0.0.3")
    clients.append(idle)
    answer = http(f"http://{boot}/boot/deb.ipxe")
    assert answer.status == 200, answer.text
    until(idle.ended, "the idle connection to make room")
    assert idle.received == b""
    listener = server.wait_for_log("boot_connections_over_cap", scope="listener")
    assert listener["cap"] == 3 and listener["refused"] is False
    # The machines read their initramfs whole after all.
    for reader in readers:
        reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        data = b""
        while chunk := reader.sock.recv(1 << 20):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == big, head
    server.wait_for_log("boot_connections_under_cap", scope="source", client="127.0.0.2")
    assert not server.trouble(), server.trouble()
