"""``pvsctl vdisk replicate`` and ``pvsctl vdisk replication``: copies between servers.

``replicate NAME [--version N] (--to SERVER ... | --all) [--rate 50M] [--no-wait]`` asks any
server's admin API to have each destination pull the version from a good copy, then follows
the copies (a progress bar per destination on a terminal, a line every few seconds
otherwise) until each is done or failed. ``replication [NAME]`` shows, per vDisk, version and
server, whether the copy is identical, damaged, missing or being copied, and every copy
running or finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from pvs_protocol import sizes
from pvsd import transfer as tr
from pvsd.console import UserError
from pvsd.console.client import AdminClient, connect, options_parser
from pvsd.console.output import print_table
from pvsd.console.tables import duration, human_size
from pvsd.names import validate_name

POLL_INTERVAL = 0.5
LINE_INTERVAL = 1.0
"""Seconds between progress lines when stderr is not a terminal (and a line at each step)."""
SILENCE_LIMIT = 30.0
"""A destination not heard of for this long is no longer waited for (its copy resumes once
its pvsd runs again)."""
FINISHED = (str(tr.State.DONE), str(tr.State.FAILED))
_STATUS_STYLE = {
    "identical": "green", "copying": "cyan", "missing": "yellow", "checking": "yellow",
    "different": "red", "damaged": "bold red", "failed": "bold red",
}
JSON = dict[str, Any]


def add_replicate_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = [options_parser()]
    replicate = commands.add_parser(
        "replicate", parents=common,
        help="copy a version of a vDisk to other servers over the site, checked and resumable",
    )
    replicate.add_argument("name", help="the vDisk's name")
    replicate.add_argument("--version", type=int, help="which version (default: the newest)")
    where = replicate.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", action="append", metavar="SERVER",
                       help="a server to copy to (repeatable)")
    where.add_argument("--all", action="store_true", help="every server that is up")
    replicate.add_argument(
        "--rate", type=sizes.parse_rate,
        help="bytes per second each copy fetches at most: 50M, 800K, 0 for no limit (default: "
        "each server's replication_rate)",
    )
    replicate.add_argument("--no-wait", action="store_true",
                           help="start the copies and return (follow them with `replication`)")
    replicate.set_defaults(handler=_replicate)

    view = commands.add_parser(
        "replication", parents=common,
        help="which server holds which version (identical, damaged, missing, copying)",
    )
    view.add_argument("name", nargs="?", help="only this vDisk (default: all)")
    view.set_defaults(handler=_replication)


# -- replicate --------------------------------------------------------------------------------


def _replicate(args: argparse.Namespace) -> int:
    validate_name(args.name)
    client = connect(args)
    body: JSON = {"to": args.to if args.to else "all"}
    if args.version is not None:
        body["version"] = args.version
    if args.rate is not None:
        body["rate"] = args.rate
    answer = client.post(f"/v1/vdisks/{args.name}/replicate", body)
    results = [r for r in answer.get("results", []) if isinstance(r, dict)]
    copying = [str(r["server"]) for r in results if r.get("ok") and r.get("state") == "copying"]
    as_json = bool(getattr(args, "json", False))
    if not as_json:
        _print_started(answer, results, args.rate)
    refused = [r for r in results if not r.get("ok")]
    if args.no_wait or not copying:
        if as_json:
            print(json.dumps(answer, indent=2))
        return 1 if refused else 0
    final = _follow(client, args.name, int(answer["version"]), copying, quiet=as_json)
    if as_json:
        print(json.dumps(answer | {"replications": final}, indent=2))
    else:
        _print_final(final, copying)
    good = all(final.get(server, {}).get("state") == str(tr.State.DONE) for server in copying)
    return 0 if good and not refused else 1


def _print_started(answer: Mapping[str, Any], results: Sequence[JSON], rate: int | None) -> None:
    limit = "" if rate is None else f", at most {tr.format_rate(rate)} each"
    print(f"{answer.get('vdisk')} version {answer.get('version')} ({answer.get('short')}) from "
          f"{answer.get('source')}{limit}:")
    for result in results:
        server, state = result.get("server"), result.get("state")
        if not result.get("ok"):
            print(f"  {server}: NOT copied: {result.get('error')}", file=sys.stderr)
        elif state == "identical":
            source = " (the source)" if result.get("source") else ""
            print(f"  {server}: holds an identical copy already{source}")
        elif state == "down":
            print(f"  {server}: down, left out: replicate to it once it is back")
        elif result.get("note") == "already copying":
            print(f"  {server}: copying already ({result.get('percent')}%)")
        elif result.get("note") not in (None, "copying"):
            print(f"  {server}: copying ({result.get('note')})")
        else:
            print(f"  {server}: copying")


def _follow(
    client: AdminClient, name: str, version: int, servers: list[str], *, quiet: bool
) -> dict[str, JSON]:
    """Poll the site until each server's copy is done or failed (or its server is silent
    for too long); returns the last status of each."""
    last: dict[str, JSON] = {}
    heard = dict.fromkeys(servers, time.monotonic())
    console = Console(stderr=True)
    live = console.is_terminal and not quiet
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[left]}"),
        console=console, transient=True, disable=not live,
    )
    tasks: dict[str, TaskID] = {}
    next_line = time.monotonic()
    steps: dict[str, tuple[object, object]] = {}
    with progress:
        while True:
            answer = client.get(f"/v1/replications?vdisk={name}")
            now = time.monotonic()
            for copy in answer.get("replications", []):
                server = copy.get("server")
                if server in heard and copy.get("version") == version:
                    last[server], heard[server] = copy, now
            waiting = [
                s for s in servers if last.get(s, {}).get("state") not in FINISHED
                and now - heard[s] < SILENCE_LIMIT
            ]
            for server in servers:
                copy = last.get(server)
                if copy is None:
                    continue
                if server not in tasks:
                    tasks[server] = progress.add_task(
                        server, total=copy.get("bytes_total") or 1, rate="", left=""
                    )
                progress.update(
                    tasks[server], completed=copy.get("bytes_done") or 0,
                    rate=_rate_text(copy), left=_left_text(copy),
                )
            step = {s: (c.get("state"), c.get("step")) for s, c in last.items()}
            if not live and not quiet and (now >= next_line or step != steps):
                next_line, steps = now + LINE_INTERVAL, step
                for server in servers:
                    if server in last:
                        print(_line(server, last[server]), file=sys.stderr, flush=True)
            if not waiting:
                break
            time.sleep(POLL_INTERVAL)
    for server in servers:
        if last.get(server, {}).get("state") not in FINISHED:
            last[server] = last.get(server, {}) | {
                "state": "unknown",
                "error": f"{server} has not answered for {SILENCE_LIMIT:g} s: its copy resumes "
                "once its pvsd runs again; see pvsctl vdisk replication",
            }
    return last


def _line(server: str, copy: Mapping[str, Any]) -> str:
    state = copy.get("state")
    if state == str(tr.State.COPYING):
        return (
            f"{server}: {copy.get('step')}: {copy.get('percent')}%, "
            f"{human_size(int(copy.get('bytes_done') or 0))} of "
            f"{human_size(int(copy.get('bytes_total') or 0))}, {_rate_text(copy)}"
            f"{', ' + _left_text(copy) if _left_text(copy) else ''}"
        )
    return f"{server}: {state}"


def _rate_text(copy: Mapping[str, Any]) -> str:
    rate = copy.get("rate")
    return tr.format_rate(rate).replace("unlimited", "-") if isinstance(rate, int | float) else ""


def _left_text(copy: Mapping[str, Any]) -> str:
    left = copy.get("seconds_left")
    if copy.get("state") != str(tr.State.COPYING) or not isinstance(left, int | float):
        return ""
    return f"{duration(left)} left"


def _print_final(final: Mapping[str, JSON], servers: Sequence[str]) -> None:
    for server in servers:
        copy = final.get(server, {})
        if copy.get("state") == str(tr.State.DONE):
            moved = int(copy.get("bytes_transferred") or 0)
            seconds = float(copy.get("seconds") or 0.0)
            speed = f" ({tr.format_rate(moved / seconds)})" if seconds > 0 and moved else ""
            print(f"  {server}: done: {human_size(moved)} fetched in {seconds:.1f} s{speed}, "
                  "checked against the manifest")
        else:
            print(f"  {server}: FAILED: {copy.get('error')}", file=sys.stderr)


# -- replication view ---------------------------------------------------------------------------


def _replication(args: argparse.Namespace) -> None:
    if args.name is not None:
        validate_name(args.name)
    path = "/v1/replications" + (f"?vdisk={args.name}" if args.name else "")
    answer = connect(args).get(path)
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
        return
    versions = [v for v in answer.get("versions", []) if isinstance(v, dict)]
    if not versions:
        if args.name:
            raise UserError(f"no server of the site holds a vDisk named {args.name!r}; see "
                            "pvsctl vdisks")
        print("no vDisks on any server of the site")
    else:
        print_table(versions_table(versions))
    copies = [c for c in answer.get("replications", []) if isinstance(c, dict)]
    if copies:
        print_table(copies_table(copies))
    for error in answer.get("errors", []):
        print(f"pvsctl: copies on {error.get('server')} are missing: {error.get('error')}",
              file=sys.stderr)


def versions_table(versions: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("vDisk", "Version", "Copy targets get", "Server", "Status", "Detail")
    for index, version in enumerate(versions):
        if index:
            table.add_section()
        for row, server in enumerate(version.get("servers", [])):
            status = str(server.get("status"))
            shown = f"copying {server.get('percent')}%" if status == "copying" else status
            detail = ""
            if status == "copying" and server.get("seconds_left") is not None:
                detail = f"{duration(float(server['seconds_left']))} left"
            elif status in ("different", "damaged", "checking"):
                detail = str(server.get("short") or "")
            elif status == "failed":
                detail = str(server.get("error") or "")
            name = str(server.get("server")) + ("" if server.get("up") else " (down)")
            table.add_row(
                str(version.get("vdisk")) if row == 0 else "",
                str(version.get("version")) if row == 0 else "",
                str(version.get("short") or "-") if row == 0 else "",
                name, Text(shown, style=_STATUS_STYLE.get(status, "")), detail,
            )
    return table


def copies_table(copies: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("Server", "vDisk", "Version", "From", "State", "Done", "Fetched", "Rate",
                  "Left", "Error", title="copies between servers")
    for copy in copies:
        state = str(copy.get("state"))
        if state == str(tr.State.COPYING):
            state = f"{state}: {copy.get('step')}"
        table.add_row(
            str(copy.get("server")), str(copy.get("vdisk")), str(copy.get("version")),
            str(copy.get("source")), Text(state, style=_STATUS_STYLE.get(str(copy.get("state")),
                                                                         "")),
            f"{copy.get('percent')}%", human_size(int(copy.get("bytes_transferred") or 0)),
            _rate_text(copy), _left_text(copy), str(copy.get("error") or ""),
        )
    return table
