"""The admin API of the site's list of servers: forgetting one that left for good.

A server that stops stays in every peer's view as ``down``: the site cannot tell a server that
was switched off for good (or renamed) from one that will be back. ``pvsctl servers forget
NAME`` says which:

- ``POST /v1/servers/{name}/forget`` (site-wide): refused while the server is up (409: stop it
  first) and for a name nobody knows (404); otherwise every up server forgets it, this one
  included, each answering for itself. It comes back if it speaks again.
- ``POST /v1/local/servers/{name}/forget``: this server's part (409 if it hears NAME).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pvsd import audit
from pvsd.admin_common import ApiError
from pvsd.names import InvalidName, validate_server_name
from pvsd.site import Peer, Site

if TYPE_CHECKING:
    from pvsd.admin import AdminServer

JSON = dict[str, Any]


class ServersApi:
    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/servers/{name}/forget", self._forget),
            web.post("/v1/local/servers/{name}/forget", self._local_forget),
        ]

    async def _forget(self, request: web.Request) -> web.Response:
        name = server_name(request)
        this = self.admin.config.name
        if name == this:
            raise ApiError(
                409, f"{name} is the server you asked ({this}), and it is up: ask another "
                "server of the site once it is stopped for good",
            )
        site = self._site()
        peer = site.peers.get(name)
        if peer is None:
            known = sorted({self.admin.config.name, *site.peers})
            raise ApiError(
                404, f"no server named {name!r} in this site's view; known servers: "
                f"{', '.join(known)} (see pvsctl servers)",
            )
        if peer.up:
            raise ApiError(409, _up_message(name, peer, self.admin.config.name))
        audit.note(request, before=_peer_json(peer), after=None)
        results = await self.admin.everywhere(
            "POST", f"/v1/local/servers/{name}/forget", b"", ""
        )
        ok = all(result.get("ok") is True for result in results)
        return web.json_response({"server": name, "ok": ok, "results": results})

    async def _local_forget(self, request: web.Request) -> web.Response:
        name = server_name(request)
        site = self._site()
        peer = site.peers.get(name)
        if peer is not None and peer.up:
            raise ApiError(409, _up_message(name, peer, self.admin.config.name))
        forgotten = site.forget(name)
        return web.json_response(self.admin.result(True, forgotten=forgotten))

    def _site(self) -> Site:
        site = self.admin.server.site
        if site is None:
            raise ApiError(
                409, f"{self.admin.config.name} is not part of a site (no site key): it has "
                "no other servers to forget",
            )
        return site


def server_name(request: web.Request) -> str:
    """The server name in the path, checked (400) before it reaches anything."""
    name = request.match_info["name"]
    try:
        return validate_server_name(name)
    except InvalidName as error:
        raise ApiError(400, str(error)) from None


def _up_message(name: str, peer: Peer, this: str) -> str:
    silent = max(time.monotonic() - peer.last_heard, 0.0)
    return (
        f"{name} is up (heard by {this} {silent:.1f} s ago): only a server that is down can be "
        f"forgotten; stop its pvsd for good first (systemctl disable --now pvsd on it), wait "
        "until pvsctl servers shows it down, then forget it"
    )


def _peer_json(peer: Peer) -> JSON:
    return {
        "server": peer.name, "up": peer.up, "stream_address": peer.heartbeat.stream_address,
        "last_heard_seconds": round(max(time.monotonic() - peer.last_heard, 0.0), 1),
    }
