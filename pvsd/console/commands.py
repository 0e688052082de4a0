"""Site-wide pvsctl commands, each one request to any server's admin API.

``servers``, ``vdisks``, ``targets``, ``stop-stream``, ``start-stream``, ``site status`` and
``site keygen`` (which needs no server at all), plus `set_through_admin` for ``vdisk set``
without ``--store``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pvsd.console import UserError, tables
from pvsd.console.client import TIMEOUT, connect, options_parser

STREAM_TIMEOUT = 60.0
"""stop-stream waits while the server's targets move elsewhere (its drain timeout)."""


def add_site_commands(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = [options_parser()]
    servers = groups.add_parser(
        "servers", parents=common, help="every server of the site: state, power, load"
    )
    servers.set_defaults(handler=_servers)
    vdisks = groups.add_parser(
        "vdisks", parents=common, help="replication status of every vDisk on every server"
    )
    vdisks.set_defaults(handler=_vdisks)
    targets = groups.add_parser(
        "targets", parents=common, help="every target streaming from the site, and from where"
    )
    targets.set_defaults(handler=_targets)
    for action, text in (
        ("stop", "move a server's targets elsewhere and stop its stream service"),
        ("start", "start a server's stream service again"),
    ):
        command = groups.add_parser(f"{action}-stream", parents=common, help=text)
        command.add_argument("server", help="server name, as `pvsctl servers` shows it")
        command.set_defaults(handler=_stream, action=action)

    site = groups.add_parser("site", help="the site key and the site's counters")
    commands = site.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = commands.add_parser("keygen", help="print a new random site key (64 hex digits)")
    keygen.add_argument(
        "--output", type=Path, help="write it to this new file (mode 600) instead of stdout"
    )
    keygen.set_defaults(handler=_keygen)
    status = commands.add_parser(
        "status", parents=common, help="counters of one server: coordination, admin requests"
    )
    status.set_defaults(handler=_site_status)


def _servers(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/servers")
    if _print_json(args, answer):
        return
    _print(tables.servers_table(_list(answer, "servers")))


def _vdisks(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/vdisks")
    if _print_json(args, answer):
        return
    vdisks = _list(answer, "vdisks")
    if not vdisks:
        print("no vDisks on any server of the site")
    else:
        _print(tables.vdisks_table(vdisks))
    for error in _list(answer, "errors"):
        print(
            f"pvsctl: damage detail and scrub progress of {error.get('server')} are missing: "
            f"{error.get('error')}",
            file=sys.stderr,
        )


def _targets(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/targets")
    if not _print_json(args, answer):
        targets = _list(answer, "targets")
        if targets:
            _print(tables.targets_table(targets))
        else:
            print("no target is streaming from the site")
    for error in _list(answer, "errors"):
        print(
            f"pvsctl: targets of {error.get('server')} are missing: {error.get('error')}",
            file=sys.stderr,
        )


def _stream(args: argparse.Namespace) -> None:
    client = connect(args, timeout=STREAM_TIMEOUT)
    answer = client.post(f"/v1/servers/{args.server}/{args.action}-stream", {})
    if _print_json(args, answer):
        return
    state = answer.get("state", "?")
    moved = answer.get("targets_before", 0)
    detail = f" ({moved} targets were told to log in elsewhere)" if args.action == "stop" else ""
    print(f"{answer.get('server', args.server)}: stream service {state}{detail}")


def _site_status(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/site")
    if not _print_json(args, answer):
        _print(tables.site_table(answer))


def _keygen(args: argparse.Namespace) -> None:
    key = secrets.token_hex(32)
    output: Path | None = args.output
    if output is None:
        print(key)
        print(
            "pvsctl: save it with 'pvsctl site keygen > FILE; chmod 600 FILE' (or --output "
            "FILE) and copy the file to every server of the site",
            file=sys.stderr,
        )
        return
    try:
        descriptor = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(
            f"{output} exists; a new key would lock out servers using the old one: "
            "choose another file, or remove it first"
        ) from None
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    print(f"wrote a new site key to {output} (mode 600); copy it to every server of the site")


def set_through_admin(args: argparse.Namespace, changes: Mapping[str, Any]) -> None:
    """``vdisk set`` for the whole site: every server saves the change beside its replica."""
    client = connect(args, timeout=TIMEOUT)
    answer = client.post(f"/v1/vdisks/{args.name}/settings", dict(changes))
    if _print_json(args, answer):
        if answer.get("ok") is not True:
            raise UserError(f"vDisk {args.name}: not changed on every server; see 'results'")
        return
    failed = []
    for result in _list(answer, "results"):
        server = result.get("server", "?")
        if result.get("ok") is not True:
            failed.append(str(server))
            print(f"{server}: NOT changed: {result.get('error')}")
        elif result.get("held") is False:
            print(f"{server}: does not hold {args.name}")
        elif result.get("changed"):
            manifest = result.get("manifest")
            if isinstance(manifest, dict):
                print(
                    f"{server}: saved; manifest version {manifest.get('version')}, root "
                    f"{manifest.get('digest')}"
                )
            else:
                print(f"{server}: saved")
        else:
            print(f"{server}: already so")
    if failed:
        raise UserError(
            f"vDisk {args.name} was not changed on {', '.join(failed)}: its settings now differ "
            "between servers; fix the cause and run the same command again"
        )


def _print_json(args: argparse.Namespace, answer: Mapping[str, Any]) -> bool:
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
        return True
    return False


def _list(answer: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = answer.get(key, [])
    if not isinstance(value, list):
        raise UserError(f"the admin API answered without a '{key}' list: is it a pvsd?")
    return [item for item in value if isinstance(item, dict)]


def _print(table: Table) -> None:
    # Piped output is read by people through less or grep: do not squeeze it to 80 columns.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    Console(width=160 if wide else None).print(table)
