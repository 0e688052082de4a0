"""``pvs-target attach`` and ``pvs-target status``: the long-lived target and its report."""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import json
import os
import signal
import socket
import sys
from typing import Any

import structlog
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pvs_protocol.addresses import (
    NBD_PORT,
    Endpoint,
    TcpEndpoint,
    UnixEndpoint,
    parse_address,
    parse_endpoint,
)
from pvs_protocol.identity import ReplicaIdentity
from pvs_target.connection import ClientError
from pvs_target.control import DEFAULT_PATH, ControlServer, query
from pvs_target.export import add_nbd_options, export_status, status_lines
from pvs_target.failover import FailoverSettings, GaveUp, VDiskStream
from pvs_target.login import LoginError
from pvs_target.logs import configure_logging
from pvs_target.loop import run
from pvs_target.notation import NOTATION
from pvs_target.rootfs import exec_as_root_storage, protect
from pvs_target.sockets import ClaimError, Holder, SocketClaim
from pvs_target.units import positive_size

log = structlog.get_logger("pvs_target")


def add_commands(commands: Any, address: Any, default_device: str) -> None:
    attach = commands.add_parser(
        "attach", help="attach a vDisk and keep streaming it through every failover",
        description="Log in, stream the vDisk for as long as this runs, fail over when a "
        "server goes away, and answer 'pvs-target status' on the control socket.",
        epilog=NOTATION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    attach.add_argument(
        "--server", action="append", required=True, type=address, metavar="HOST:PORT",
        help="a login server; repeat to give fallbacks (up to four are usual)",
    )
    attach.add_argument("--vdisk", required=True, metavar="NAME", help="the vDisk to attach")
    attach.add_argument("--device-id", default=default_device, metavar="ID",
                        help="the name this target logs in as (default: from the host name, "
                        "%(default)s)")
    attach.add_argument("--control", default=DEFAULT_PATH, metavar="PATH",
                        help="control socket for 'pvs-target status'; one attached target per "
                        "path (default %(default)s)")
    attach.add_argument("--nbd", type=_nbd_endpoint, metavar="ADDRESS",
                        help="export the vDisk over NBD here: HOST:PORT, unix:PATH or an NBD "
                        "URI (see below)")
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
    attach.add_argument("--no-checksum", action="store_true",
                        help="do not ask servers for CRC32 on the data (blocks of a Standard "
                        "Image are still checked against the manifest)")
    attach.add_argument("--cache", choices=["ram", "ram+overflow", "file"], default="ram+overflow",
                        help="write cache for Standard Image vDisks (default %(default)s)")
    attach.add_argument("--cache-size", type=positive_size, default=4 << 30, metavar="SIZE",
                        help="write cache limit; full means ENOSPC (default 4G)")
    attach.add_argument("--cache-ram", type=positive_size, default=256 << 20, metavar="SIZE",
                        help="RAM part of a ram+overflow cache (default 256M)")
    attach.add_argument("--cache-dir", default="", metavar="DIR",
                        help="directory of the cache file (default: the temp directory)")
    attach.add_argument("--metrics", type=functools.partial(parse_address, default_port=None),
                        metavar="HOST:PORT", help="serve Prometheus metrics at "
                        "http://HOST:PORT/metrics (no authentication: bind it to loopback or a "
                        "management network)")
    attach.add_argument("--pin", type=_identity_token, metavar="IDENTITY",
                        help="stream exactly this version from the first login (an identity "
                        "token, as pvsd's boot script gives a machine whose kernel came from it)")
    attach.add_argument("--root-storage", action="store_true",
                        help="this target holds the machine's root file system: outlive "
                        "systemd's shutdown (argv[0] @pvs-target), ignore SIGTERM and SIGINT, "
                        "never be chosen by the OOM killer (see docs/diskless.md)")
    add_nbd_options(attach)
    attach.set_defaults(handler=attach_command)

    status = commands.add_parser("status", help="show what an attached target streams from")
    status.add_argument("--control", default=DEFAULT_PATH, metavar="PATH",
                        help="control socket of the attached target (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=status_command)


class AttachFailed(Exception):
    """Attaching cannot go on; the message says why and what to do, in one line."""


def _identity_token(text: str) -> ReplicaIdentity:
    try:
        return ReplicaIdentity.from_token(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _nbd_endpoint(text: str) -> Endpoint:
    return parse_endpoint(text, default_port=NBD_PORT, nbd=True)


def attach_command(args: argparse.Namespace) -> int:
    """Everything that can go wrong before the target is attached is checked first, in the
    order that costs the user least (the command line, the paths, then the servers), and told
    as one line with exit code 2."""
    unprotected: list[str] = []
    if args.root_storage:
        exec_as_root_storage()
        unprotected = protect()  # logged once warnings are shown, when attached
    claims: list[SocketClaim] = []
    try:
        _check_options(args)
        holder = Holder(os.getpid(), args.vdisk, args.device_id)
        claims.append(SocketClaim.acquire(args.control, "--control", holder))
        if isinstance(args.nbd, UnixEndpoint):
            claims.append(SocketClaim.acquire(args.nbd.path, "--nbd", holder))
        return run(_attach(args, unprotected))
    except (AttachFailed, ClaimError) as error:
        return _fail(str(error))
    except LoginError as error:
        return _fail(error.message)
    except ClientError as error:
        return _fail(str(error))
    finally:
        for claim in reversed(claims):
            claim.release()


def _fail(message: str) -> int:
    print(f"pvs-target: error: {message}", file=sys.stderr)
    return 2


def _check_options(args: argparse.Namespace) -> None:
    nbd: Endpoint | None = args.nbd
    if nbd is not None and nbd.export not in ("", args.vdisk):
        raise AttachFailed(
            f"--nbd {nbd.nbd_uri()}: the export is named after the vDisk: write "
            f"{nbd.nbd_uri(args.vdisk)}, or leave the name out"
        )
    if isinstance(nbd, UnixEndpoint) and _same_path(nbd.path, args.control):
        raise AttachFailed(f"--nbd and --control are both {args.control}: give two paths")
    if isinstance(nbd, TcpEndpoint) and nbd.port:
        _check_port_free(nbd)
    if args.cache_dir and not (
        os.path.isdir(args.cache_dir) and os.access(args.cache_dir, os.W_OK | os.X_OK)
    ):
        raise AttachFailed(
            f"--cache-dir {args.cache_dir} is not a directory this user can write: create it "
            "(or fix its permissions), or give another"
        )


def _same_path(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def _check_port_free(nbd: TcpEndpoint) -> None:
    """Before logging in, which may wait long for a server: a taken port is known now."""
    try:
        infos = socket.getaddrinfo(nbd.host, nbd.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise AttachFailed(f"--nbd {nbd}: cannot resolve {nbd.host!r}: {error.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the export binds
            try:
                probe.bind(address)
            except OSError as error:
                raise AttachFailed(_listen_failure("--nbd", str(nbd), error)) from None


def _listen_failure(option: str, where: str, error: OSError) -> str:
    reason = os.strerror(error.errno).lower() if error.errno else str(error)
    advice = {
        errno.EADDRINUSE: "stop what uses it, or give another",
        errno.EACCES: "run as a user allowed to (root, below port 1024), or give another",
        errno.EADDRNOTAVAIL: "give an address of this machine, or another",
    }.get(error.errno or 0, "give another")
    return f"{option} {where}: cannot listen there: {reason}: {advice} {option}"


async def _attach(args: argparse.Namespace, unprotected: list[str]) -> int:
    settings = FailoverSettings(
        keepalive_interval=args.keepalive, dead_after=args.dead_after,
        request_timeout=args.request_timeout,
        give_up_after=args.give_up_after, checksum=not args.no_checksum,
    )
    stream = VDiskStream(
        args.server, args.vdisk, args.device_id, settings=settings, pin=args.pin
    )
    try:
        await stream.open()
    except GaveUp:
        reason = stream.core.waiting_reason or "no server answered"
        raise AttachFailed(
            f"vDisk {args.vdisk!r}: no server streamed it within --give-up-after "
            f"{args.give_up_after:g} s: {reason}"
        ) from None
    try:
        return await _serve(args, stream, unprotected)
    finally:
        await stream.close()


async def _serve(args: argparse.Namespace, stream: VDiskStream, unprotected: list[str]) -> int:
    control = ControlServer(args.control, stream.status)
    try:
        await control.start()
    except OSError as error:
        raise AttachFailed(_listen_failure("--control", args.control, error)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        if args.root_storage:
            loop.add_signal_handler(signum, _keep_root, signal.Signals(signum).name)
        else:
            loop.add_signal_handler(signum, stop.set)
    export = reporting = None
    try:
        if args.nbd:
            from pvs_target.export import start_export

            try:
                export = await start_export(stream, str(args.nbd), args)
            except OSError as error:
                raise AttachFailed(_listen_failure("--nbd", str(args.nbd), error)) from None
            control.add(functools.partial(export_status, export))
        from pvs_target.metrics import Reporting

        try:
            reporting = await Reporting.start(stream, export, args.metrics)  # and systemd
        except OSError as error:
            raise AttachFailed(_listen_failure("--metrics", str(args.metrics), error)) from None
        session = stream.last_session  # the current one may be gone already: say the last
        assert session is not None, "open() logged in"
        print(json.dumps({
            "event": "attached", "vdisk": args.vdisk, "server": session.server_name,
            "address": session.connected_to, "control": args.control,
            "nbd": export.address if export is not None else "",
            "nbd_uri": _nbd_endpoint(export.address).nbd_uri(args.vdisk) if export else "",
        }), flush=True)
        configure_logging(args.verbose, quiet=False)  # from now on warnings go to the journal
        for problem in unprotected:
            log.warning("root_storage_unprotected", problem=problem)
        await stop.wait()
    finally:
        if reporting is not None:
            await reporting.close()
        if export is not None:
            export.close()
            await export.wait_closed()
        await control.close()
    return 0


def _keep_root(signal_name: str) -> None:
    log.warning("root_storage_signal_ignored", signal=signal_name,
                advice="this target holds the root file system: it ends when the machine "
                "powers off")


def status_command(args: argparse.Namespace) -> int:
    try:
        status = asyncio.run(query(args.control))
    except (OSError, ValueError) as error:  # ValueError: an answer that is not JSON
        print(f"pvs-target: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        render(status)
    return 0


def render(status: dict[str, Any]) -> None:
    # a terminal: its width, long words folded; a pipe: whole rows, never cut
    console = Console(width=None if sys.stdout.isatty() else 1 << 20)
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
    lines += status_lines(status)
    for key, value in lines:
        console.print(f"[bold]{key:<13}[/bold] {escape(str(value))}")
    if status["failovers"]:
        table = Table(title="failover history")
        for column in ("when", "from", "to", "why", "noticed after ms", "took ms",
                       "in flight", "longest wait ms"):
            table.add_column(column, overflow="fold")
        for record in status["failovers"]:
            table.add_row(*map(escape, (
                record["at"], f"{record['from']['name']} {record['from']['address']}",
                f"{record['to']['name']} {record['to']['address']}", record["reason"],
                str(record.get("detected_after_ms", 0)), str(record["took_ms"]),
                str(record.get("in_flight", 0)), str(record["longest_wait_ms"]),
            )))
        console.print(table)
    if verification.get("mismatches"):
        table = Table(title="blocks that did not match the manifest")
        for column in ("when", "server", "block", "offset", "what"):
            table.add_column(column, overflow="fold")
        for mismatch in verification["mismatches"]:
            table.add_row(*map(escape, (
                mismatch["at"], f"{mismatch['server']} {mismatch['address']}",
                str(mismatch["block"]), str(mismatch["offset"]), mismatch["message"],
            )))
        console.print(table)
