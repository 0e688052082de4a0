"""``pvs-target``: the target's command line.

    pvs-target read --server 10.0.0.1:6910 --vdisk win10 -o win10.img
    pvs-target attach --server 10.0.0.1:6910 --vdisk win10 --nbd unix:/run/win10.sock
    pvs-target status --json

Results go to stdout (one JSON object with --json); progress, logs and errors to stderr. Exit
status: 0 done, 1 a Standard Image could not be read whole with every block matching the
manifest root pinned at login (no server left that sends good data), 2 any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

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

from pvs_protocol.addresses import STREAM_PORT, parse_address
from pvs_protocol.identity import ReplicaIdentity
from pvs_target.attach import add_commands
from pvs_target.client import ClientError, Session, read_range
from pvs_target.failover import FailoverSettings, GaveUp, VDiskStream
from pvs_target.logs import configure_logging
from pvs_target.loop import loop_name, run
from pvs_target.notation import NOTATION
from pvs_target.units import positive_size
from pvs_target.verify import ReadVerifier
from pvsd.version import add_version_option

EXIT_OK, EXIT_MISMATCH, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("pvs-target: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also what the pvs-target(8) man page is made from)."""
    parser = argparse.ArgumentParser(
        prog="pvs-target", description="Attach and read vDisks streamed by pvsd.",
        epilog=NOTATION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log to stderr (-v info, -vv debug)"
    )
    add_version_option(parser)  # the same --version as pvsd's and pvsctl's
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )

    read = commands.add_parser(
        "read", help="copy a whole vDisk, checking every block against its manifest",
        description="Stream a whole vDisk and check every block as it arrives against the "
        "manifest whose root the login pinned; a server that sends a bad block is told, "
        "dropped, and the rest is read from another server.",
        epilog=NOTATION, formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "--chunk", type=positive_size, default=1 << 20, metavar="SIZE",
        help="bytes per request, e.g. 256K or 1M (the server may cap it; default 1M)",
    )
    read.add_argument(
        "--no-checksum", action="store_true", help="do not ask for CRC32 on the data"
    )
    read.add_argument(
        "--connect-timeout", type=float, default=5.0, metavar="SECONDS",
        help="per server, for connecting and logging in (default %(default)s)",
    )
    read.add_argument(
        "--dead-after", type=float, default=1.5, metavar="SECONDS",
        help="a server from which nothing whole arrives this long is left (default %(default)s)",
    )
    read.add_argument(
        "--request-timeout", type=float, default=0.0, metavar="SECONDS",
        help="a request unanswered this long: move to another server (default: --dead-after)",
    )
    read.add_argument(
        "--give-up-after", type=float, default=60.0, metavar="SECONDS",
        help="fail after this long without a server that streams the vDisk (default "
        "%(default)s; 0 waits for ever)",
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
    """Of what was read, for the admin's convenience: the manifest root is the proof."""
    loop: str
    verification: ReadVerifier | None
    """None for a Private Image, whose manifest changes with every write."""
    failovers: list[dict[str, object]] = dataclasses.field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Every byte of the image was read, and each block was checked before it was kept."""
        return self.verification is not None and self.bytes_read == self.session.size

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / self.seconds / 1e6 if self.seconds > 0 else 0.0


class NoGoodServer(ClientError):
    """A server sent data that does not match the manifest and no other would stream it."""


def _read_command(args: argparse.Namespace) -> int:
    try:
        report = run(_read(args), use_uvloop=not args.no_uvloop)
    except NoGoodServer as error:
        print(f"pvs-target: error: {error}", file=sys.stderr)
        return EXIT_MISMATCH
    except (ClientError, OSError) as error:
        return _error(str(error))
    if args.json:
        print(json.dumps(_report_json(report, args), sort_keys=True))
    else:
        _print_report(report)
    if report.verified or report.verification is None:
        return EXIT_OK
    return EXIT_MISMATCH


async def _read(args: argparse.Namespace) -> ReadReport:
    """Read the whole vDisk through a ``VDiskStream``: every block checked against the pinned
    manifest, a server that stalls, drips or sends bad data left for another (the bad one
    dropped), and chunks kept in order."""
    settings = FailoverSettings(
        connect_timeout=args.connect_timeout, max_request=args.chunk,
        checksum=not args.no_checksum, dead_after=args.dead_after,
        request_timeout=args.request_timeout, give_up_after=args.give_up_after,
    )
    stream = VDiskStream(
        args.server, args.vdisk, args.device_id, settings=settings, wait_for_first=False
    )
    await stream.open()
    try:
        session = stream.last_session
        assert session is not None  # open() logged in
        with _open_output(args.output) as output, _progress(args) as progress:
            task = progress.add_task(f"{args.vdisk} from {session.server_name}", total=stream.size)
            consumer = _Consumer(output, progress, task)
            start = time.perf_counter()
            try:
                await read_range(
                    session, 0, stream.size, chunk=_chunk(args, stream), depth=args.depth,
                    sink=consumer, read=stream.read,
                )
                await consumer.drain()
            except GaveUp as error:
                verification = stream.verification
                if verification is not None and verification.dropped:
                    raise NoGoodServer(str(error)) from None
                raise
            finally:
                consumer.close()
            seconds = time.perf_counter() - start
    finally:
        await stream.close()
    last = stream.last_session
    assert last is not None
    return ReadReport(
        last, consumer.position, seconds, consumer.sha256.hexdigest(), loop_name(),
        stream.verification, [record.to_json() for record in stream.history],
    )


def _chunk(args: argparse.Namespace, stream: VDiskStream) -> int:
    """Whole manifest blocks per chunk when verifying, so each chunk is checked at once."""
    chunk: int = min(args.chunk, stream.max_request)
    if stream.verification is not None:
        block_size = stream.verification.shape.block_size
        chunk = max(block_size, chunk - chunk % block_size)
    return chunk


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
        self.position = 0
        """Bytes kept so far, in order: where a read that had to move goes on from."""

    async def __call__(self, offset: int, data: bytes | bytearray) -> None:
        self.position = offset + len(data)
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
    print(f"sha256    {report.sha256} (of what was read)")
    verification = report.verification
    if verification is None:
        print("verified: no (a Private Image is not checked: its manifest changes with writes)")
        return
    print(
        f"checked   {verification.blocks_checked} blocks of {identity.block_size} bytes, "
        f"{verification.pages_fetched} digest pages"
    )
    for name, address in verification.dropped.items():
        print(f"DROPPED   {name} at {address}: it sent data that does not match the manifest")
    if report.verified:
        print("verified: true (every block matched the manifest root pinned at login)")
    else:
        print(f"verified: false (only {report.bytes_read} of {identity.size} bytes were kept)")


def _identity_line(identity: ReplicaIdentity) -> str:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(identity.timestamp_ns / 1e9))
    return (
        f"version {identity.version}, {identity.size} bytes, manifest root "
        f"{identity.digest.hex()}, created {created} ({identity.timestamp_ns} ns), "
        f"block size {identity.block_size}"
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
        "manifest": {
            "root": session.identity.digest.hex(),
            "version": session.identity.version,
            "created_ns": session.identity.timestamp_ns,
            "block_size": session.identity.block_size,
        },
        "verification": (
            report.verification.status() if report.verification is not None
            else {"enabled": False, "reason": "Private Image"}
        ),
        "checksum": session.connection.checksum.name,
        "failovers": report.failovers,
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
    """A login server, as ``HOST:PORT`` (the stream port when none is given)."""
    return str(parse_address(text, default_port=STREAM_PORT, any_port=False))


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


if __name__ == "__main__":
    sys.exit(main())
