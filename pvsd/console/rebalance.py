"""``pvsctl rebalance [--dry-run | --status]``: automatic rebalancing, run now or looked at.

Every server decides for its own targets (`pvsd.rebalance`); any server's admin API asks them
all. ``--dry-run`` shows the plans without moving anything; ``--status`` shows each server's
last plan and its recent moves instead of deciding.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from pvsd.console.client import connect, options_parser
from pvsd.console.output import answer_list, print_table

JSON = dict[str, Any]


def add_rebalance_commands(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rebalance = groups.add_parser(
        "rebalance", parents=[options_parser()],
        help="move targets from busy servers to the least busy now, and show the plan",
    )
    what = rebalance.add_mutually_exclusive_group()
    what.add_argument(
        "--dry-run", action="store_true", help="show what would move, without moving anything"
    )
    what.add_argument(
        "--status", action="store_true",
        help="each server's last plan, its settings and recent moves (decides nothing)",
    )
    rebalance.set_defaults(handler=_rebalance)


def _rebalance(args: argparse.Namespace) -> None:
    client = connect(args)
    if args.status:
        answer = client.get("/v1/rebalance")
    else:
        answer = client.post("/v1/rebalance", {"dry_run": bool(args.dry_run)})
    servers = answer_list(answer, "servers")
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
    elif args.status:
        _print_status(servers)
    else:
        _print_plans(servers, dry_run=bool(args.dry_run))
    for error in answer_list(answer, "errors"):
        print(f"pvsctl: {error.get('server')}: {error.get('error')}", file=sys.stderr)


def _print_plans(servers: Sequence[Mapping[str, Any]], *, dry_run: bool) -> None:
    print_table(plans_table(servers))
    moves = [move | {"from": s.get("server")} for s in servers for move in _moves(s)]
    if moves:
        print_table(moves_table(moves, "Planned moves" if dry_run else "Moves"))
    if dry_run:
        print(
            f"dry run: nothing moved; 'pvsctl rebalance' tells these {len(moves)} targets to "
            "log in again elsewhere" if moves else "dry run: nothing would move"
        )
    elif moves:
        print(
            f"telling these {len(moves)} targets to log in again elsewhere, a few at a time as "
            "they land; 'pvsctl rebalance --status' shows the moves"
        )
    else:
        print("nothing to move")


def _print_status(servers: Sequence[Mapping[str, Any]]) -> None:
    table = Table("Server", "Automatic", "Trigger", "Interval", "Runs", "Moved", "Last plan",
                  title="Rebalancing")
    for server in servers:
        last = server.get("last")
        verdict = (
            f"{last.get('at')} ({last.get('trigger')}): {last.get('verdict')}"
            if isinstance(last, dict) else "no decision yet"
        ) + (" (moving targets now)" if server.get("busy") else "")
        table.add_row(
            str(server.get("server")), "on" if server.get("enabled") else "off",
            f"{server.get('trigger_percent')}%", f"{server.get('interval')} s",
            str(server.get("runs")), str(server.get("moved")), verdict,
        )
    print_table(table)
    moves = [move for s in servers for move in answer_list(s, "recent_moves")]
    moves.sort(key=lambda m: str(m.get("at")))
    if moves:
        print_table(moves_table(moves[-40:], "Recent moves"))
    else:
        print("no target was moved by rebalancing yet")


def plans_table(servers: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("Server", "Targets", "Load", "Booting", "Moves", "Expected", "Plan",
                  title="Rebalance plan")
    for server in servers:
        expected = server.get("expected")
        mine = expected.get(str(server.get("server"))) if isinstance(expected, dict) else None
        table.add_row(
            str(server.get("server")), str(server.get("targets")), f"{server.get('load')}",
            str(server.get("booting")), str(len(_moves(server))),
            str(mine) if mine is not None else "", str(server.get("verdict")),
        )
    return table


def moves_table(moves: Sequence[Mapping[str, Any]], title: str) -> Table:
    table = Table("Target", "vDisk", "From", "To (expected)", "Why", title=title)
    for move in moves:
        table.add_row(
            str(move.get("target")), str(move.get("vdisk")), str(move.get("from")),
            str(move.get("to")), str(move.get("reason")),
        )
    return table


def _moves(server: Mapping[str, Any]) -> list[JSON]:
    return answer_list(server, "moves")
