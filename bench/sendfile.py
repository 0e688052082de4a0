"""Replies from the page cache three ways: what pvsd does (read, CRC-32, send), the same
without the CRC, and ``os.sendfile``. Issue 10 asked whether, once targets check every block
against the manifest, pvsd should drop the CRC and send straight from the page cache.

    .venv/bin/python bench/sendfile.py [--size 1G] [--chunk 1M] [--runs 3]

One loopback TCP stream, a receiver process that only drains, the same cached file for every
way, alternating runs, medians. Prints MB/s and the sender's CPU per GiB (user + system of
this process, which only sends). Every loop is bounded by the file size and the run count.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from zlib_ng.zlib_ng import crc32

from pvs_target.units import parse_size

GIB = 1 << 30


def _drain(port: int, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    with socket.create_server(("127.0.0.1", port)) as server:
        ready.set()
        while True:
            connection, _ = server.accept()
            with connection:
                buffer = bytearray(1 << 20)
                while connection.recv_into(buffer):
                    pass


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _copy(fd: int, sock: socket.socket, size: int, chunk: int, checksum: bool) -> None:
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    for offset in range(0, size, chunk):
        count = os.preadv(fd, [view], offset)
        if checksum:
            crc32(view[:count])
        sock.sendall(view[:count])


def _sendfile(fd: int, sock: socket.socket, size: int, chunk: int, _checksum: bool) -> None:
    offset = 0
    while offset < size:
        sent = os.sendfile(sock.fileno(), fd, offset, min(chunk, size - offset))
        if sent == 0:
            raise OSError("sendfile sent nothing")
        offset += sent


WAYS: dict[str, tuple[Callable[[int, socket.socket, int, int, bool], None], bool]] = {
    "read + CRC-32 + send (pvsd)": (_copy, True),
    "read + send": (_copy, False),
    "sendfile": (_sendfile, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GIB)
    parser.add_argument("--chunk", type=parse_size, default=1 << 20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "image"
        with open(path, "wb") as file:
            block = os.urandom(1 << 20)
            for _ in range(args.size // len(block)):
                file.write(block)
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        _copy(fd, socket.socket(), 0, args.chunk, False)  # nothing: warms imports only
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        ready = multiprocessing.Event()
        receiver = multiprocessing.Process(target=_drain, args=(port, ready), daemon=True)
        receiver.start()
        try:
            if not ready.wait(10):
                raise SystemExit("the receiver did not start")
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
            for _ in range(args.runs):
                for name, (way, checksum) in WAYS.items():
                    with socket.create_connection(("127.0.0.1", port)) as sock:
                        cpu, start = _cpu(), time.perf_counter()
                        way(fd, sock, size, args.chunk, checksum)
                        seconds, cpu = time.perf_counter() - start, _cpu() - cpu
                    results[name].append((size / seconds / 1e6, cpu / (size / GIB) * 1000))
        finally:
            receiver.kill()
            receiver.join(5)
            os.close(fd)
    load = os.getloadavg()[0]
    print(f"{size >> 20} MiB from the page cache, {args.chunk >> 10} KiB per reply, one loopback "
          f"stream, medians of {args.runs}; load {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'way':<30} {'MB/s':>8} {'sender CPU ms/GiB':>18}")
    for name, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:<30} {rate:>8,.0f} {cpu:>18,.0f}")


if __name__ == "__main__":
    main()
