"""``pvs-target attach`` and ``pvs-target status``: the long-lived target and its report."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import structlog
from rich.console import Console
from rich.table import Table

from pvs_target.control import DEFAULT_PATH, ControlServer, query
from pvs_target.failover import FailoverSettings, VDiskStream
from pvs_target.login import LoginError
from pvs_target.loop import run
from pvs_target.units import parse_size

log = structlog.get_logger("pvs_target")


def add_commands(commands: Any, address: Any, default_device: str) -> None:
    attach = commands.add_parser(
        "attach", help="attach a vDisk and keep streaming it through every failover",
        description="Log in, stream the vDisk for as long as this runs, fail over when a "
        "server goes away, and answer 'pvs-target status' on the control socket.",
    )
    attach.add_argument(
        "--server", action="append", required=True, type=address, metavar="HOST:PORT",
        help="a login server; repeat to give fallbacks (up to four are usual)",
    )
    attach.add_argument("--vdisk", required=True, metavar="NAME")
    attach.add_argument("--device-id", default=default_device, metavar="ID")
    attach.add_argument("--control", default=DEFAULT_PATH, metavar="PATH",
                        help="control socket for 'pvs-target status' (default %(default)s)")
    attach.add_argument("--nbd", metavar="HOST:PORT|unix:PATH",
                        help="export the vDisk over NBD at this address")
    attach.add_argument("--keepalive", type=float, default=0.5, metavar="SECONDS",
                        help="keepalive interval (default %(default)s)")
    attach.add_argument("--dead-after", type=float, default=1.5, metavar="SECONDS",
                        help="a server from which nothing whole arrives this long is gone "
                        "(default %(default)s)")
    attach.add_argument("--request-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="a request unanswered this long means its server is failing: "
                        "move to another and send it again (default: --dead-after)")
    attach.add_argument("--give-up-after", type=float, default=0.0, metavar="SECONDS",
                        help="after this long without a server, requests fail at once with "
                        "one logged error, until a server returns and the stream resumes by "
                        "itself; 0 (default) waits for ever")
    attach.add_argument("--no-checksum", action="store_true")
    attach.add_argument("--cache", choices=["ram", "ram+overflow", "file"], default="ram+overflow",
                        help="write cache for Standard Image vDisks (default %(default)s)")
    attach.add_argument("--cache-size", type=parse_size, default=4 << 30, metavar="SIZE",
                        help="write cache limit; full means ENOSPC (default 4G)")
    attach.add_argument("--cache-ram", type=parse_size, default=256 << 20, metavar="SIZE",
                        help="RAM part of a ram+overflow cache (default 256M)")
    attach.add_argument("--cache-dir", default="", metavar="DIR",
                        help="directory of the cache file (default: the temp directory)")
    attach.set_defaults(handler=attach_command)

    status = commands.add_parser("status", help="show what an attached target streams from")
    status.add_argument("--control", default=DEFAULT_PATH, metavar="PATH")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=status_command)


def attach_command(args: argparse.Namespace) -> int:
    try:
        return run(_attach(args))
    except LoginError as error:
        print(f"pvs-target: error: {error.message}", file=sys.stderr)
        return 2


async def _attach(args: argparse.Namespace) -> int:
    settings = FailoverSettings(
        keepalive_interval=args.keepalive, dead_after=args.dead_after,
        request_timeout=args.request_timeout,
        give_up_after=args.give_up_after, checksum=not args.no_checksum,
    )
    stream = VDiskStream(args.server, args.vdisk, args.device_id, settings=settings)
    await stream.open()
    control = ControlServer(args.control, stream.status)
    await control.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    export = None
    if args.nbd:
        from pvs_target.export import start_export

        export = await start_export(stream, args.nbd, args)
    session = stream.session
    assert session is not None
    print(json.dumps({
        "event": "attached", "vdisk": args.vdisk, "server": session.server_name,
        "address": session.connected_to, "control": args.control, "nbd": args.nbd or "",
    }), flush=True)
    try:
        await stop.wait()
    finally:
        if export is not None:
            export.close()
            await export.wait_closed()
        await control.close()
        await stream.close()
    return 0


def status_command(args: argparse.Namespace) -> int:
    try:
        status = asyncio.run(query(args.control))
    except OSError as error:
        print(f"pvs-target: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render(status)
    return 0


def render(status: dict[str, Any]) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    server = status.get("server") or {}
    identity = status.get("identity") or {}
    failover = (
        "failover on" if status.get("failover")
        else f"no failover: {status['no_failover_reason']}"
    )
    lines = [
        ("vDisk", status["vdisk"]),
        ("state", status["state"] + (f" ({status['waiting_reason']})"
                                     if status.get("waiting_reason") else "")),
        ("server", f"{server.get('name', '-')} at {server.get('address', '-')}"),
        ("login server", status.get("login_server") or "-"),
        ("identity", f"version {identity.get('version')}, digest "
                     f"{str(identity.get('digest', ''))[:16]}…, {identity.get('size')} bytes"),
        ("mode", f"{status.get('mode')}, " + failover),
        ("read", f"{status['bytes_read']} bytes in {status['requests']} requests, "
                 f"{status.get('in_flight', 0)} in flight, "
                 f"{status['retried_requests']} retried, longest wait "
                 f"{status['longest_wait_ms']} ms"),
    ]
    if status.get("gave_up"):
        lines.append(("gave up", status["gave_up"]))
    if status.get("avoiding"):
        lines.append(("avoiding", f"{status['avoiding']} (lost without notice; tried last)"))
    verification = status.get("verification") or {}
    if verification.get("enabled"):
        lines.append((
            "verified", f"{verification['blocks_checked']} blocks checked of "
            f"{verification['block_size']} bytes, {verification['pages_fetched']} digest pages "
            f"fetched, {len(verification['mismatches'])} mismatches",
        ))
        dropped = ", ".join(
            f"{server['name']} at {server['address']}" for server in verification["dropped_servers"]
        )
        if dropped:
            lines.append(("dropped", f"{dropped} (sent data that does not match the manifest)"))
    else:
        lines.append(("verified", f"no: {verification.get('reason', 'unknown')}"))
    for key, value in lines:
        console.print(f"[bold]{key:<13}[/bold] {value}")
    if status["failovers"]:
        table = Table(title="failover history")
        for column in ("when", "from", "to", "why", "noticed after ms", "took ms",
                       "in flight", "longest wait ms"):
            table.add_column(column)
        for record in status["failovers"]:
            table.add_row(
                record["at"], f"{record['from']['name']} {record['from']['address']}",
                f"{record['to']['name']} {record['to']['address']}", record["reason"],
                str(record.get("detected_after_ms", 0)), str(record["took_ms"]),
                str(record.get("in_flight", 0)), str(record["longest_wait_ms"]),
            )
        console.print(table)
    if verification.get("mismatches"):
        table = Table(title="blocks that did not match the manifest")
        for column in ("when", "server", "block", "offset", "what"):
            table.add_column(column)
        for mismatch in verification["mismatches"]:
            table.add_row(
                mismatch["at"], f"{mismatch['server']} {mismatch['address']}",
                str(mismatch["block"]), str(mismatch["offset"]), mismatch["message"],
            )
        console.print(table)
