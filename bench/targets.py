"""Many target sessions from one process: log in all at once, read 4 KiB each, hold them open.

    python bench/targets.py --server HOST:PORT [--server ...] --vdisk bench --count 100 \
        --prefix storm-1 [--hold-max 120]

``bench/run.py`` starts a few of these for the boot storm and the idle-session test. They talk
one JSON line at a time (each with a ``"bench"`` key) on stdout, and take commands on stdin:

1. print ``{"bench": "waiting"}`` once imported, then wait for a line ``go``;
2. start ``--count`` targets at once, each ``login`` (the pvs_target library, following a
   redirect as a target does, retried with backoff while the site refuses or does not answer,
   for at most ``--login-deadline`` seconds), then one 4 KiB read at a random offset; print
   ``{"bench": "ready", "targets": [...]}`` with each target's login and read times, its server
   and its attempts;
3. hold every session open and send nothing at all (no keepalives: a plain ``Session`` has no
   monitor) until a line ``close``, end of input, or ``--hold-max`` seconds; then print
   ``{"bench": "closed", "open": N}`` (sessions still open just before closing) and close them.

RLIMIT_NOFILE is raised to its hard limit first: each session is one socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import sys
import time
from typing import Any

import structlog

from pvs_target.login import LoginError, Session, login
from pvs_target.loop import run

BLOCK = 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", required=True, help="bootstrap HOST:PORT")
    parser.add_argument("--vdisk", required=True)
    parser.add_argument("--count", type=int, required=True, help="targets in this process")
    parser.add_argument("--prefix", required=True, help="device ids are PREFIX-N")
    parser.add_argument("--login-deadline", type=float, default=60.0)
    parser.add_argument("--connect-timeout", type=float, default=5.0,
                        help="per login attempt (the library's default)")
    parser.add_argument("--hold-max", type=float, default=120.0)
    args = parser.parse_args()
    if not 1 <= args.count <= 2000:
        parser.error("--count must be 1..2000")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 2 * args.count + 100))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    structlog.configure(  # library warnings go to stderr; stdout carries only our JSON lines
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    run(_main(args))
    return 0


def say(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    say({"bench": "waiting", "count": args.count})
    if (await _command(commands, args.hold_max)) != "go":
        return
    sessions: list[Session] = []
    started = time.perf_counter()
    results = await asyncio.gather(
        *(_target(args, number, started, sessions) for number in range(args.count))
    )
    say({"bench": "ready", "targets": results,
         "seconds": time.perf_counter() - started})
    await _command(commands, args.hold_max)  # "close", end of input or the time limit
    still_open = sum(1 for session in sessions if session.connection.is_open)
    say({"bench": "closed", "open": still_open, "sessions": len(sessions)})
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    except TimeoutError:
        for session in sessions:
            session.connection.abort()


async def _command(commands: asyncio.StreamReader, timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            return (await commands.readline()).decode().strip()
    except TimeoutError:
        return ""


async def _target(
    args: argparse.Namespace, number: int, started: float, sessions: list[Session]
) -> dict[str, Any]:
    device = f"{args.prefix}-{number}"
    deadline = started + args.login_deadline
    attempts, delay, last_error = 0, 0.05, ""
    while True:
        attempts += 1
        try:
            session = await login(args.server, args.vdisk, device,
                                  connect_timeout=args.connect_timeout)
            break
        except LoginError as error:
            last_error = error.message
            if not error.retryable or time.perf_counter() + delay > deadline:
                return {"device": device, "ok": False, "attempts": attempts,
                        "error": last_error[:300],
                        "login_s": time.perf_counter() - started}
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)
    logged_in = time.perf_counter()
    sessions.append(session)
    blocks = max(session.size // BLOCK, 1)
    read_error = ""
    try:
        data = await asyncio.wait_for(
            session.connection.read(random.randrange(blocks) * BLOCK, BLOCK), 30
        )
        if len(data) != BLOCK:
            read_error = f"read {len(data)} bytes"
    except Exception as error:  # counted, not raised: one bad target must not hide the rest
        read_error = repr(error)[:300]
    return {"device": device, "ok": not read_error, "attempts": attempts,
            "error": read_error, "server": session.server_name,
            "login_s": logged_in - started, "read_s": time.perf_counter() - logged_in}


if __name__ == "__main__":
    sys.exit(main())
