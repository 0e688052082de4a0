"""One pvs client measurement in its own process, printed as one JSON object on stdout.

    python bench/pvs_client.py --server 127.0.0.1:6910 --vdisk bench seq --depth 8
    python bench/pvs_client.py --server 127.0.0.1:6910 --vdisk bench rand --depth 32 --seconds 5

``bench/stream.py`` runs this as a subprocess so that the client and pvsd are two processes, as
fio and nbdkit are. It goes through the public client library (``login``, ``read_range``,
``StreamConnection.read``) on uvloop, exactly as a target would; login is not timed.

- ``seq``: the whole vDisk in 1 MiB reads, once. ``--depth 1`` is a plain loop awaiting one read
  at a time (QD1); a larger depth uses ``read_range`` with that many requests in flight.
- ``rand``: ``--depth`` coroutines each awaiting ``connection.read(offset, 4096)`` at random
  4 KiB-aligned offsets; ``--ramp`` seconds are not counted (like fio's ``--ramp_time``), then
  ``--seconds`` are. Every loop stops at ``--max-ops`` requests whatever the clock says.

``cpu_seconds`` is this process's CPU time (user + system) over the measured part only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from typing import Any

import structlog

from pvs_target.client import Session, login, read_range
from pvs_target.loop import loop_name, run

MIB = 1 << 20
BLOCK = 4096


def main() -> int:
    args = _parser().parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = run(_measure(args), use_uvloop=not args.asyncio)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="HOST:PORT of pvsd")
    parser.add_argument("--vdisk", required=True)
    parser.add_argument("--no-checksum", action="store_true", help="ask for no CRC32 on data")
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio instead of uvloop")
    parser.add_argument("--login-seconds", type=float, default=60.0,
                        help="keep retrying login this long (the server may still be hashing)")
    workloads = parser.add_subparsers(dest="workload", required=True)
    seq = workloads.add_parser("seq", help="the whole disk in 1 MiB reads, once")
    seq.add_argument("--depth", type=int, default=8)
    seq.add_argument("--chunk", type=int, default=MIB)
    rand = workloads.add_parser("rand", help="random 4 KiB reads for a bounded time")
    rand.add_argument("--depth", type=int, default=1, help="concurrent workers")
    rand.add_argument("--seconds", type=float, default=5.0)
    rand.add_argument("--ramp", type=float, default=1.0)
    rand.add_argument("--max-ops", type=int, default=5_000_000)
    return parser


async def _login(args: argparse.Namespace) -> Session:
    deadline = time.monotonic() + args.login_seconds
    while True:
        try:
            return await login(
                [args.server], args.vdisk, "bench-client", checksum=not args.no_checksum
            )
        except Exception as error:  # IDENTITY_PENDING while pvsd hashes a fresh image
            if time.monotonic() >= deadline or not getattr(error, "retryable", False):
                raise
            await asyncio.sleep(0.2)


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    session = await _login(args)
    try:
        if args.workload == "seq":
            measured = await _sequential(session, args.depth, args.chunk)
        else:
            measured = await _random(session, args.depth, args.seconds, args.ramp, args.max_ops)
    finally:
        await session.close()
    return {
        "tool": "pvs_target library",
        "loop": loop_name(),
        "checksum": session.connection.checksum.name,
        "workload": args.workload,
        "depth": args.depth,
        **measured,
    }


async def _sequential(session: Session, depth: int, chunk: int) -> dict[str, Any]:
    connection, size = session.connection, session.size
    received = 0

    def discard(_offset: int, data: bytes) -> None:
        nonlocal received
        received += len(data)

    start, cpu_start = time.perf_counter(), time.process_time()
    if depth == 1:
        for offset in range(0, size, chunk):
            received += len(await connection.read(offset, min(chunk, size - offset)))
    else:
        await read_range(session, 0, size, chunk=chunk, depth=depth, sink=discard)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if received != size:
        raise RuntimeError(f"read {received} bytes of a {size}-byte vDisk")
    return {"bytes": received, "ops": -(-size // chunk), "seconds": seconds, "cpu_seconds": cpu,
            "mb_s": received / seconds / 1e6, "iops": -(-size // chunk) / seconds}


async def _random(
    session: Session, workers: int, seconds: float, ramp: float, max_ops: int
) -> dict[str, Any]:
    connection = session.connection
    blocks = session.size // BLOCK
    loop = asyncio.get_running_loop()
    counting = False
    counted = issued = 0
    stop_at = loop.time() + ramp + seconds
    exhausted = asyncio.Event()  # --max-ops reached before the clock ran out

    async def worker(seed: int) -> None:
        nonlocal counted, issued
        rng = random.Random(seed)
        while loop.time() < stop_at:
            if issued >= max_ops:
                exhausted.set()
                return
            issued += 1
            await connection.read(rng.randrange(blocks) * BLOCK, BLOCK)
            if counting:
                counted += 1

    async def clock() -> tuple[float, float, int]:
        nonlocal counting
        await asyncio.sleep(ramp)
        counting, start, cpu_start = True, time.perf_counter(), time.process_time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(exhausted.wait(), seconds)
        counting = False
        return time.perf_counter() - start, time.process_time() - cpu_start, counted

    async with asyncio.TaskGroup() as group:
        timer = group.create_task(clock())
        for number in range(workers):
            group.create_task(worker(number))
    elapsed, cpu, ops = timer.result()
    return {"bytes": ops * BLOCK, "ops": ops, "seconds": elapsed, "cpu_seconds": cpu,
            "mb_s": ops * BLOCK / elapsed / 1e6, "iops": ops / elapsed}


if __name__ == "__main__":
    sys.exit(main())
