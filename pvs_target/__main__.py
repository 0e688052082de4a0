"""``pvs-target``: the target's command line.

    pvs-target read --server 10.0.0.1:6910 --vdisk win10 -o win10.img
    pvs-target attach --server 10.0.0.1:6910 --vdisk win10 --nbd unix:/run/win10.sock
    pvs-target status --json

Results go to stdout (one JSON object with --json); progress, logs and errors to stderr. Exit
status: 0 done, 1 the data read does not match the replica's digest, 2 any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from pvs_protocol.identity import ReplicaIdentity
from pvs_target.address import parse_address
from pvs_target.attach import add_commands
from pvs_target.client import ClientError, Session, login, read_range
from pvs_target.loop import loop_name, run
from pvs_target.units import parse_size

EXIT_OK, EXIT_MISMATCH, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("pvs-target: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvs-target", description="Attach and read vDisks streamed by pvsd."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log to stderr (-v info, -vv debug)"
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    read = commands.add_parser(
        "read", help="copy a whole vDisk and check it against its digest",
        description="Stream a whole vDisk, hash it on the way, and compare the SHA-256 with "
        "the replica identity the server announced.",
    )
    read.add_argument(
        "--server", action="append", required=True, type=_address, metavar="HOST:PORT",
        help="a login server; repeat to give fallbacks, tried in order",
    )
    read.add_argument("--vdisk", required=True, metavar="NAME", help="the vDisk to read")
    read.add_argument(
        "-o", "--output", metavar="FILE", help="write the image here (default: discard)"
    )
    read.add_argument(
        "--device-id", default=default_device_id(), metavar="ID",
        help="the name this target logs in as (default: from the host name, %(default)s)",
    )
    read.add_argument(
        "--depth", type=_positive, default=32, metavar="N",
        help="requests in flight (the server may allow fewer; default %(default)s)",
    )
    read.add_argument(
        "--chunk", type=parse_size, default=1 << 20, metavar="SIZE",
        help="bytes per request, e.g. 256K or 1M (the server may cap it; default 1M)",
    )
    read.add_argument(
        "--no-checksum", action="store_true", help="do not ask for CRC32 on the data"
    )
    read.add_argument(
        "--connect-timeout", type=float, default=5.0, metavar="SECONDS",
        help="per server, for connecting and logging in (default %(default)s)",
    )
    read.add_argument("--json", action="store_true", help="print one JSON object")
    read.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    read.add_argument("--no-uvloop", action="store_true", help="use the plain asyncio loop")
    read.set_defaults(handler=_read_command)
    add_commands(commands, _address, default_device_id())
    return parser


# -- read ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ReadReport:
    session: Session
    bytes_read: int
    seconds: float
    sha256: str
    loop: str

    @property
    def verified(self) -> bool:
        return self.sha256 == self.session.identity.digest.hex()

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _read_command(args: argparse.Namespace) -> int:
    try:
        report = run(_read(args), use_uvloop=not args.no_uvloop)
    except (ClientError, OSError) as error:
        return _error(str(error))
    if args.json:
        print(json.dumps(_report_json(report, args), sort_keys=True))
    else:
        _print_report(report)
    return EXIT_OK if report.verified else EXIT_MISMATCH


async def _read(args: argparse.Namespace) -> ReadReport:
    session = await login(
        args.server, args.vdisk, args.device_id, max_request=args.chunk,
        checksum=not args.no_checksum, connect_timeout=args.connect_timeout,
    )
    try:
        with _open_output(args.output) as output, _progress(args) as progress:
            task = progress.add_task(f"{args.vdisk} from {session.server_name}", total=session.size)
            consumer = _Consumer(output, progress, task)
            start = time.perf_counter()
            try:
                await read_range(
                    session, 0, session.size, chunk=args.chunk, depth=args.depth, sink=consumer
                )
                await consumer.drain()
            finally:
                consumer.close()
            seconds = time.perf_counter() - start
    except ClientError as error:
        raise ClientError(
            f"reading {args.vdisk!r} from {session.connected_to} failed: {error}"
        ) from error
    finally:
        await session.close()
    return ReadReport(session, session.size, seconds, consumer.sha256.hexdigest(), loop_name())


class _Consumer:
    """Hashes and writes chunks in order on one worker thread, so the event loop keeps
    receiving meanwhile (SHA-256 releases the GIL); at most ``backlog`` chunks wait."""

    def __init__(
        self, output: BinaryIO | None, progress: Progress, task: TaskID, backlog: int = 8
    ) -> None:
        self.sha256 = hashlib.sha256()
        self._output = output
        self._progress = progress
        self._task = task
        self._backlog = backlog
        self._queued: deque[asyncio.Future[None]] = deque()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="pvs-target-digest")

    async def __call__(self, offset: int, data: bytes | bytearray) -> None:
        loop = asyncio.get_running_loop()
        self._queued.append(loop.run_in_executor(self._worker, self._consume, data))
        self._progress.update(self._task, advance=len(data))
        while len(self._queued) > self._backlog:
            await self._queued.popleft()

    def _consume(self, data: bytes | bytearray) -> None:
        self.sha256.update(data)
        if self._output is not None:
            self._output.write(data)

    async def drain(self) -> None:
        while self._queued:
            await self._queued.popleft()

    def close(self) -> None:
        for future in self._queued:
            future.cancel()
        self._worker.shutdown(wait=True)


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[BinaryIO | None]:
    if path is None:
        yield None
        return
    with open(path, "wb") as output:
        yield output


def _progress(args: argparse.Namespace) -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=args.quiet or not console.is_terminal,
        transient=True,
    )


def _print_report(report: ReadReport) -> None:
    session, identity = report.session, report.session.identity
    via = f" (via {session.login_server})" if session.redirected else ""
    print(f"server    {session.server_name} at {session.connected_to}{via}")
    print(f"vdisk     {_identity_line(identity)}")
    print(
        f"read      {report.bytes_read} bytes in {report.seconds:.2f} s, "
        f"{report.mb_per_second:.1f} MB/s ({report.loop}, checksum "
        f"{session.connection.checksum.name})"
    )
    print(f"sha256 {report.sha256}")
    if report.verified:
        print("verified: the data read matches the replica identity's digest")
    else:
        print(f"MISMATCH: the replica identity's digest is {identity.digest.hex()}")


def _identity_line(identity: ReplicaIdentity) -> str:
    return (
        f"version {identity.version}, {identity.size} bytes, "
        f"digest {identity.digest.hex()}, timestamp_ns {identity.timestamp_ns}"
    )


def _report_json(report: ReadReport, args: argparse.Namespace) -> dict[str, object]:
    session = report.session
    return {
        "vdisk": args.vdisk,
        "server": {
            "name": session.server_name,
            "address": session.connected_to,
            "advertised_address": session.server_address,
        },
        "login_server": session.login_server,
        "redirected": session.redirected,
        "identity": session.identity.to_json(),
        "bytes": report.bytes_read,
        "seconds": round(report.seconds, 6),
        "mb_per_s": round(report.mb_per_second, 1),
        "sha256": report.sha256,
        "verified": report.verified,
        "checksum": session.connection.checksum.name,
        "chunk": min(args.chunk, session.max_request),
        "depth": args.depth,
        "loop": report.loop,
    }


# -- helpers ------------------------------------------------------------------------------------


def default_device_id() -> str:
    """The short host name, lower-cased, reduced to letters, digits and '-'."""
    name = socket.gethostname().split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]+", "-", name).strip("-") or "pvs-target"


def _address(text: str) -> str:
    try:
        return str(parse_address(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _error(message: str) -> int:
    print(f"pvs-target: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _configure_logging(verbosity: int) -> None:
    # Failures are reported as one line by the command itself; logs are for -v.
    level = logging.ERROR if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


if __name__ == "__main__":
    sys.exit(main())
