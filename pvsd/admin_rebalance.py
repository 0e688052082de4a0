"""The admin API of automatic rebalancing (`pvsd.rebalancing`).

Site-wide (any server answers for the whole site; each server decides for its own targets):

- ``GET /v1/rebalance``: every server's settings, last plan, counters and recent moves.
- ``POST /v1/rebalance`` ``{"dry_run": true|false}``: every up server decides now and answers
  with its plan; unless ``dry_run``, it then tells the targets of its plan to move, in waves
  (``pvsctl rebalance [--dry-run]``). A server still carrying out a round refuses (409).

This server's own part: ``GET`` and ``POST /v1/local/rebalance``, the same for this server.
A server that is down is one error entry, never a failed request.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pvsd.admin_common import ApiError, parse_json
from pvsd.rebalancing import Busy, Rebalancer

if TYPE_CHECKING:
    from pvsd.admin import AdminServer

JSON = dict[str, Any]
LOCAL = "/v1/local/rebalance"


class RebalanceApi:
    """The handlers; ``rebalancer`` is set by pvsd once its `Rebalancer` runs (only a server
    of a site has one)."""

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.rebalancer: Rebalancer | None = None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/rebalance", self._site_state),
            web.post("/v1/rebalance", self._site_run),
            web.get(LOCAL, self._local_state),
            web.post(LOCAL, self._local_run),
        ]

    # -- site-wide --------------------------------------------------------------------------

    async def _site_state(self, request: web.Request) -> web.Response:
        servers, errors = await self._everywhere("GET", b"")
        return web.json_response({"servers": servers, "errors": errors})

    async def _site_run(self, request: web.Request) -> web.Response:
        body = await request.read()
        dry_run = parse_run(body)
        servers, errors = await self._everywhere("POST", json.dumps({"dry_run": dry_run}).encode())
        return web.json_response({"dry_run": dry_run, "servers": servers, "errors": errors})

    async def _everywhere(self, method: str, body: bytes) -> tuple[list[JSON], list[JSON]]:
        results = await self.admin.everywhere(method, LOCAL, body, "")
        servers = [r for r in results if r.get("ok") is True]
        errors = [
            {"server": r.get("server"), "error": r.get("error", "no answer")}
            for r in results if r.get("ok") is not True
        ]
        site = self.admin.server.site
        for peer in site.peers.values() if site is not None else ():
            if not peer.up:
                errors.append({
                    "server": peer.name,
                    "error": f"{peer.name} is down: it decides for its own targets once back",
                })
        servers.sort(key=lambda s: str(s.get("server")))
        return servers, errors

    # -- this server ------------------------------------------------------------------------

    async def _local_state(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, **self._running().state()})

    async def _local_run(self, request: web.Request) -> web.Response:
        dry_run = parse_run(await request.read())
        try:
            answer = await self._running().run_now(dry_run=dry_run)
        except Busy as busy:
            raise ApiError(409, str(busy)) from None
        return web.json_response({"ok": True, **answer})

    def _running(self) -> Rebalancer:
        if self.rebalancer is None:
            raise ApiError(
                409, f"{self.admin.config.name} is not part of a site (no site key), so it "
                "does not rebalance; give it --key-file and --peer",
            )
        return self.rebalancer


def parse_run(body: bytes) -> bool:
    """``{"dry_run": bool}`` (or no body: a real run) -> dry_run."""
    data = parse_json(body, example='{"dry_run": true} or nothing')
    if data is None:
        return False
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object such as {\"dry_run\": true}")
    unknown = sorted(set(data) - {"dry_run"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; the only one is dry_run")
    dry_run = data.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise ApiError(400, "dry_run must be true or false")
    return dry_run
