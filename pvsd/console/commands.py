"""Site-wide pvsctl commands, each one request to any server's admin API.

``servers``, ``vdisks``, ``targets``, ``stop-stream``, ``start-stream``, ``site status``,
``site keygen`` and ``site certs`` (which need no server at all), plus `set_through_admin` for
``vdisk set`` without ``--store``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pvsd.console import UserError, tables
from pvsd.console.client import TIMEOUT, connect, options_parser
from pvsd.console.output import answer_list, print_json, print_table
from pvsd.names import validate_name, validate_server_name
from pvsd.tls import CERTIFICATE_DAYS, TlsError, check_host, make_site_certificates

STREAM_TIMEOUT = 60.0
"""stop-stream waits while the server's targets move elsewhere (its drain timeout)."""


def add_site_commands(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = [options_parser()]
    servers = groups.add_parser(
        "servers", parents=common, help="every server of the site: state, power, load"
    )
    servers.set_defaults(handler=_servers)
    server_actions = servers.add_subparsers(dest="action", metavar="[forget NAME]")
    forget = server_actions.add_parser(
        "forget", parents=common,
        help="remove a server that left for good (down) from every server's list",
    )
    forget.add_argument("name", help="server name, as `pvsctl servers` shows it")
    forget.set_defaults(handler=_forget)
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
    add_certs_command(commands)
    status = commands.add_parser(
        "status", parents=common, help="counters of one server: coordination, admin requests"
    )
    status.set_defaults(handler=_site_status)


def _servers(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/servers")
    if print_json(args, answer):
        return
    print_table(tables.servers_table(answer_list(answer, "servers")))


def _forget(args: argparse.Namespace) -> None:
    name = validate_server_name(args.name)
    answer = connect(args).post(f"/v1/servers/{name}/forget", {})
    if print_json(args, answer):
        return
    failed = [r for r in answer_list(answer, "results") if r.get("ok") is not True]
    for result in answer_list(answer, "results"):
        if result.get("ok") is not True:
            said = f"NOT forgotten: {result.get('error')}"
        else:
            said = "forgot it" if result.get("forgotten") else "did not know it"
        print(f"{result.get('server')}: {said}")
    if failed:
        raise UserError(
            f"{name} is still listed by {', '.join(str(r.get('server')) for r in failed)}; "
            "run the same command again once they answer"
        )
    print(f"{name} forgotten; it comes back if it speaks again: remove it from 'peers' in "
          "every server's configuration")


def _vdisks(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/vdisks")
    if print_json(args, answer):
        return
    vdisks = answer_list(answer, "vdisks")
    if not vdisks:
        print("no vDisks on any server of the site")
    else:
        print_table(tables.vdisks_table(vdisks))
    for error in answer_list(answer, "errors"):
        print(
            f"pvsctl: damage detail and scrub progress of {error.get('server')} are missing: "
            f"{error.get('error')}",
            file=sys.stderr,
        )


def _targets(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/targets")
    if not print_json(args, answer):
        targets = answer_list(answer, "targets")
        if targets:
            print_table(tables.targets_table(targets))
        else:
            print("no target is streaming from the site")
    for error in answer_list(answer, "errors"):
        print(
            f"pvsctl: targets of {error.get('server')} are missing: {error.get('error')}",
            file=sys.stderr,
        )


def _stream(args: argparse.Namespace) -> None:
    client = connect(args, timeout=STREAM_TIMEOUT)
    answer = client.post(f"/v1/servers/{args.server}/{args.action}-stream", {})
    if print_json(args, answer):
        return
    state = answer.get("state", "?")
    moved = answer.get("targets_before", 0)
    detail = f" ({moved} targets were told to log in elsewhere)" if args.action == "stop" else ""
    print(f"{answer.get('server', args.server)}: stream service {state}{detail}")


def _site_status(args: argparse.Namespace) -> None:
    answer = connect(args).get("/v1/site")
    if not print_json(args, answer):
        print_table(tables.site_table(answer))


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


def add_certs_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = commands.add_parser(
        "certs", help="make the site CA and a TLS certificate per server for the admin API",
        description="Make the site CA (ca.pem, ca.key) in DIR, or reuse the one there, and "
        "a certificate and key per server (NAME.pem, NAME.key) for its name and hosts: give "
        "them to each server as admin_tls_cert, admin_tls_key and admin_tls_ca, and ca.pem to "
        "pvsctl as --ca. To add a server later, run it again with the same DIR.",
    )
    certs.add_argument("--out", metavar="DIR", type=Path, required=True,
                       help="directory for the files (the site CA is made there, or reused)")
    certs.add_argument(
        "--server", metavar="NAME=HOST[,HOST...]", action="append", default=[], required=True,
        help="a server: its name (pvsd --name) and every host name or IP address it is reached "
        "at (repeatable)",
    )
    certs.add_argument("--client", metavar="NAME", action="append", default=[],
                       help="also a client certificate for pvsctl --cert (repeatable)")
    certs.add_argument("--days", type=int, default=CERTIFICATE_DAYS,
                       help=f"validity of each certificate (default {CERTIFICATE_DAYS})")
    certs.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> None:
    servers: dict[str, list[str]] = {}
    for text in args.server:
        name, _, hosts = str(text).partition("=")
        try:
            validate_server_name(name)
            listed = [check_host(host.strip()) for host in hosts.split(",") if host.strip()]
        except ValueError as error:
            raise UserError(f"--server {text}: {error}") from None
        if not listed:
            raise UserError(f"--server {text}: write NAME=HOST[,HOST...], the hosts it is "
                            "reached at (host names or IP addresses)")
        servers[name] = listed
    for name in args.client:
        try:
            validate_name(name, what="client")
        except ValueError as error:
            raise UserError(f"--client {name}: {error}") from None
    if not 1 <= args.days <= 3650:
        raise UserError(f"--days {args.days}: give 1 to 3650")
    try:
        made = make_site_certificates(args.out, servers, args.client, days=args.days)
    except TlsError as error:
        raise UserError(str(error)) from None
    if made.new_ca:
        print(f"made the site CA: {made.ca} (to every server, and to pvsctl as --ca) and "
              f"{made.ca_key} (keep it apart, mode 600: it makes the certificates of servers "
              "added later)")
    else:
        print(f"signed with the site CA in {made.ca}")
    for name, (cert, key) in made.servers.items():
        print(f"{name} ({', '.join(servers[name])}): in its pvsd.toml:")
        print(f'    admin_tls_cert = "{cert}"')
        print(f'    admin_tls_key = "{key}"')
        print(f'    admin_tls_ca = "{made.ca}"')
    for name, (cert, key) in made.clients.items():
        print(f"client {name}: pvsctl --cert {cert} --cert-key {key} --ca {made.ca}")
    print(f"then: pvsctl --admin HOST:PORT --ca {made.ca} ... (or PVS_CA={made.ca})")


def set_through_admin(args: argparse.Namespace, changes: Mapping[str, Any]) -> None:
    """``vdisk set`` for the whole site: every server saves the change beside its replica."""
    client = connect(args, timeout=TIMEOUT)
    answer = client.post(f"/v1/vdisks/{args.name}/settings", dict(changes))
    if print_json(args, answer):
        if answer.get("ok") is not True:
            raise UserError(f"vDisk {args.name}: not changed on every server; see 'results'")
        return
    failed = []
    for result in answer_list(answer, "results"):
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
