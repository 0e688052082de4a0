"""``pvsctl vdisk version ...`` and ``pvsctl vdisk versions``: the life of a vDisk version.

new (a maintenance copy of the newest version) -> boot the maintenance device, change it ->
promote (test: test devices get it) -> promote (production: pending until every server
holds it, then every new login) -> merge (the older versions go once nobody uses them).
Each command is one request to any server's admin API.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from pvsd.console import UserError
from pvsd.console.client import TIMEOUT, connect, options_parser
from pvsd.console.output import print_json, print_table

MAKE_TIMEOUT = 3600.0
"""A new version copies a whole image where the filesystem cannot share blocks."""


def add_version_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = [options_parser()]
    listing = commands.add_parser(
        "versions", parents=common,
        help="versions of a vDisk: state, pending, which servers hold each, targets using it",
    )
    listing.add_argument("name", help="the vDisk's name")
    listing.set_defaults(handler=_versions)

    version = commands.add_parser("version", help="make, promote, merge and delete versions")
    actions = version.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new", parents=common, help="make a maintenance version: a copy of the newest one"
    )
    new.add_argument("name", help="the vDisk's name")
    new.add_argument("--from", dest="source", type=int, help="start from this version")
    new.set_defaults(handler=_new)
    promote = actions.add_parser(
        "promote", parents=common,
        help="maintenance -> test -> production (default: the newest version not in production)",
    )
    promote.add_argument("name", help="the vDisk's name")
    promote.add_argument(
        "--version", type=int, help="which version (default: the newest not in production)"
    )
    promote.add_argument("--to", choices=("test", "production"), help="skip to this state")
    promote.set_defaults(handler=_promote)
    merge = actions.add_parser(
        "merge", parents=common,
        help="make a production version the base: delete the older ones nobody uses",
    )
    merge.add_argument("name", help="the vDisk's name")
    merge.add_argument("--version", type=int, help="the new base (default: newest production)")
    merge.set_defaults(handler=_merge)
    delete = actions.add_parser(
        "delete", parents=common, help="delete a version no target uses, on every server"
    )
    delete.add_argument("name", help="the vDisk's name")
    delete.add_argument("--version", type=int, required=True, help="the version to delete")
    delete.set_defaults(handler=_delete)
    listed = actions.add_parser("list", parents=common, help="the same as `vdisk versions`")
    listed.add_argument("name", help="the vDisk's name")
    listed.set_defaults(handler=_versions)


def _versions(args: argparse.Namespace) -> None:
    answer = connect(args, timeout=TIMEOUT).get(f"/v1/vdisks/{args.name}/versions")
    if print_json(args, answer):
        return
    table = Table(title=f"versions of {args.name}")
    for column in ("version", "state", "identity", "held by", "lacking", "targets"):
        table.add_column(column)
    for row in answer.get("versions", []):
        state = str(row.get("state"))
        if row.get("pending"):
            state += " (pending)"
        copies = row.get("copies", {})
        odd = [f"{server}: {c.get('status')}" for server, c in copies.items()
               if isinstance(c, dict) and c.get("status") != "identical"]
        table.add_row(
            str(row.get("version")), state, str(row.get("short") or "-"),
            ", ".join(row.get("holders", [])) or "-",
            ", ".join([*(row.get("lacking", []) if row.get("state") != "maintenance" else []),
                       *odd]) or "-",
            str(row.get("targets", 0)),
        )
    print_table(table)
    for error in answer.get("errors", []):
        print(f"{error.get('server')}: {error.get('error')}")


def _new(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {} if args.source is None else {"from": args.source}
    answer = connect(args, timeout=MAKE_TIMEOUT).post(f"/v1/vdisks/{args.name}/versions", body)
    if print_json(args, answer):
        return
    print(f"version {answer.get('version')} of {args.name} made on {answer.get('server')} "
          f"from version {answer.get('from')}: maintenance, {answer.get('short')}")
    print(f"next: boot a maintenance device (vdisk set {args.name} --maintenance-devices ID) "
          f"to change it, then: pvsctl vdisk version promote {args.name}")


def _promote(args: argparse.Namespace) -> None:
    client = connect(args, timeout=TIMEOUT)
    number = args.version
    if number is None:
        rows = client.get(f"/v1/vdisks/{args.name}/versions").get("versions", [])
        candidates = [r for r in rows if r.get("state") != "production"]
        if not candidates:
            raise UserError(f"every version of {args.name} is in production already: make a "
                            f"new one with pvsctl vdisk version new {args.name}")
        number = candidates[0].get("version")
    body = {} if args.to is None else {"to": args.to}
    answer = client.post(f"/v1/vdisks/{args.name}/versions/{number}/promote", body)
    if print_json(args, answer):
        _fail_if_partial(args, answer)
        return
    print(f"version {number} of {args.name} is now {answer.get('state')}")
    _print_results(answer)
    if answer.get("state") == "production":
        print(f"it is pending until every server holds it: pvsctl vdisk replicate {args.name} "
              f"--version {number} --all, then see pvsctl vdisk versions {args.name}")
    _fail_if_partial(args, answer)


def _merge(args: argparse.Namespace) -> None:
    body = {} if args.version is None else {"version": args.version}
    answer = connect(args, timeout=TIMEOUT).post(f"/v1/vdisks/{args.name}/merge", body)
    if print_json(args, answer):
        _fail_if_partial(args, answer)
        return
    print(f"{args.name}: version {answer.get('base')} is the base")
    for removed in answer.get("removed", []):
        print(f"  version {removed.get('version')}: deleted"
              + ("" if removed.get("ok") else " (not on every server; see --json)"))
    for kept in answer.get("kept", []):
        print(f"  version {kept.get('version')}: kept, in use by {kept.get('used_by')}; run "
              "merge again once they have logged in again")
    _fail_if_partial(args, answer)


def _delete(args: argparse.Namespace) -> None:
    answer = connect(args, timeout=TIMEOUT).post(
        f"/v1/vdisks/{args.name}/versions/{args.version}/delete", {}
    )
    if print_json(args, answer):
        _fail_if_partial(args, answer)
        return
    print(f"version {args.version} of {args.name} deleted")
    _print_results(answer)
    _fail_if_partial(args, answer)


def _print_results(answer: dict[str, Any]) -> None:
    for result in answer.get("results", []):
        if result.get("ok") is not True:
            print(f"  {result.get('server')}: NOT done: {result.get('error')}")
        elif result.get("held") is False:
            print(f"  {result.get('server')}: does not hold it")
        else:
            print(f"  {result.get('server')}: done")


def _fail_if_partial(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if answer.get("ok") is not True:
        raise UserError(f"{args.name}: not done on every server (see above); fix the cause and "
                        "run the same command again")
