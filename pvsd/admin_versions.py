"""The admin API for versions: list, new, promote, merge and delete, site-wide.

Any server answers. What each version is (its state, which servers hold it, whether it is
pending) comes from the coordination view; which targets use a version comes from every up
server's ``/v1/local/targets``, asked at the moment of the request, because a version in use
must never be deleted and a maintenance version still written must not be promoted. Changes
go to each server's ``/v1/local/vdisks/NAME/versions/...``: a new version is made on one
server holding the version it starts from (then replicated), a state change and a deletion on
every server holding the vDisk.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from pvsd import balance
from pvsd.admin_common import ApiError, json_object, vdisk_name
from pvsd.properties import properties_path, set_version_state
from pvsd.replication import Holder, versions_report, views_of
from pvsd.version_files import VersionFileError, delete_version, make_version
from pvsd.versions import VersionState

if TYPE_CHECKING:
    from pvsd.admin import AdminServer

log = structlog.get_logger("pvsd.admin")

JSON = dict[str, Any]
MAKE_TIMEOUT = 3600.0
"""A new version copies a whole image where the filesystem cannot share blocks."""
SETTLE_TIMEOUT = 15.0
"""How long a change waits to show in this server's view of the site before answering."""
PUBLISH_TIMEOUT = 30.0
"""How long a new version's server waits for its catalog to publish the copy."""
_NEXT = {VersionState.maintenance: VersionState.test, VersionState.test: VersionState.production}


class VersionsApi:
    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/vdisks/{name}/versions", self._list),
            web.post("/v1/vdisks/{name}/versions", self._new),
            web.post("/v1/vdisks/{name}/versions/{version}/promote", self._promote),
            web.post("/v1/vdisks/{name}/versions/{version}/delete", self._delete),
            web.post("/v1/vdisks/{name}/merge", self._merge),
            web.post("/v1/local/vdisks/{name}/versions/new", self._local_new),
            web.post("/v1/local/vdisks/{name}/versions/{version}/state", self._local_state),
            web.post("/v1/local/vdisks/{name}/versions/{version}/delete", self._local_delete),
        ]

    # -- site-wide --------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        name = _name(request)
        holders = self._holders(name)
        targets, errors = await self.admin.site_targets()
        return web.json_response({
            "vdisk": name, "versions": self._rows(holders, targets), "errors": errors,
        })

    async def _new(self, request: web.Request) -> web.Response:
        name = _name(request)
        body = await _body(request)
        holders = self._holders(name)
        statuses = self._statuses(name, holders)
        busy = [s for s in statuses if s.state is VersionState.maintenance]
        if busy:
            raise _error(409, f"version {busy[0].version} of {name} is in maintenance already: "
                         f"promote it (pvsctl vdisk version promote {name}) or delete it first")
        start = body.get("from")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
            raise _error(400, '"from" must be a version number')
        usable = [s for s in statuses if s.identity is not None and s.holders]
        source = next((s for s in usable if start is None or s.version == start), None)
        if source is None:
            which = f"version {start}" if start is not None else "any version"
            raise _error(409, f"no serving server holds a good copy of {which} of {name} to "
                         "start from: see pvsctl vdisk versions " + name)
        number = max(h.entry.version for h in holders) + 1
        server = self.admin.config.name
        if server not in source.holders:
            server = source.holders[0]
        payload = {"version": number, "from": source.version, "created_ns": time.time_ns()}
        answer = await self.admin.ask(server, "POST", f"/v1/local/vdisks/{name}/versions/new",
                                      payload, MAKE_TIMEOUT)
        await self._settled(name, lambda rows: any(
            s.version == number and s.identity is not None for s in rows))
        log.info("admin_version_new", vdisk=name, version=number, source=source.version,
                 server=server, peer=request.remote)
        return web.json_response(answer)

    async def _promote(self, request: web.Request) -> web.Response:
        name, number = _name(request), _version(request)
        body = await _body(request)
        holders = self._holders(name)
        statuses = {s.version: s for s in self._statuses(name, holders)}
        status = statuses.get(number)
        if status is None:
            raise _error(404, f"{name} has no version {number}; its versions: "
                         f"{_numbers(statuses)} (pvsctl vdisk versions {name})")
        goal = _NEXT.get(status.state)
        wanted = body.get("to")
        if wanted is not None:
            if wanted not in ("test", "production"):
                raise _error(400, '"to" must be "test" or "production"')
            goal = VersionState(wanted) if status.state.rank < VersionState(wanted).rank else None
        if goal is None:
            raise _error(409, f"version {number} of {name} is in {status.state} already: "
                         "nothing to promote it to; make a new version with pvsctl vdisk "
                         f"version new {name}")
        newer = [s.version for s in statuses.values()
                 if s.version > number and s.state.rank >= goal.rank]
        if newer:
            raise _error(409, f"version {max(newer)} of {name} is newer and in "
                         f"{statuses[max(newer)].state} already: promoting version {number} "
                         "would put an older version above it; delete it, or promote the "
                         "newest")
        targets, errors = await self.site_targets()
        if status.state is VersionState.maintenance:
            writers = [t for t in targets if t.get("vdisk") == name and t.get("version") == number]
            if writers:
                raise _error(409, f"version {number} of {name} is still written by "
                             f"{_who(writers)}: shut that device down, then promote")
            if errors:
                raise _error(503, "cannot tell whether a maintenance device still writes "
                             f"version {number}: {errors[0]['error']}; try again")
        results = await self._everywhere(name, f"versions/{number}/state", {"state": str(goal)})
        ok = all(r.get("ok") is True for r in results)
        await self._settled(name, lambda rows: any(
            s.version == number and s.state is goal for s in rows))
        log.info("admin_version_promoted", vdisk=name, version=number, state=str(goal), ok=ok,
                 peer=request.remote)
        return web.json_response({"vdisk": name, "version": number, "state": str(goal),
                                  "ok": ok, "results": results})

    async def _delete(self, request: web.Request) -> web.Response:
        name, number = _name(request), _version(request)
        holders = self._holders(name)
        known = {h.entry.version for h in holders}
        if number not in known:
            raise _error(404, f"{name} has no version {number}; its versions: "
                         f"{', '.join(map(str, sorted(known)))} (pvsctl vdisk versions {name})")
        if known == {number}:
            raise _error(409, f"version {number} is the only version of {name}: deleting it "
                         "would delete the vDisk; remove its files by hand if that is meant")
        await self._refuse_in_use(name, [number])
        results = await self._everywhere(name, f"versions/{number}/delete", {})
        ok = all(r.get("ok") is True for r in results)
        await self._settled(name, lambda rows: all(s.version != number for s in rows))
        log.info("admin_version_deleted", vdisk=name, version=number, ok=ok, peer=request.remote)
        return web.json_response({"vdisk": name, "version": number, "ok": ok,
                                  "results": results})

    async def _merge(self, request: web.Request) -> web.Response:
        """Versions are full images: merging makes version N the base by removing every
        older version no target uses; those still in use stay, named, for later."""
        name = _name(request)
        body = await _body(request)
        holders = self._holders(name)
        statuses = self._statuses(name, holders)
        production = [s for s in statuses if s.state is VersionState.production and s.identity]
        base = body.get("version")
        if base is None:
            if not production:
                raise _error(409, f"{name} has no production version to make the base; "
                             "promote one first")
            base = production[0].version
        if not isinstance(base, int) or isinstance(base, bool):
            raise _error(400, '"version" must be a version number')
        chosen = next((s for s in statuses if s.version == base), None)
        if chosen is None:
            raise _error(404, f"{name} has no version {base}; its versions: "
                         f"{_numbers({s.version: s for s in statuses})}")
        if chosen.state is not VersionState.production:
            raise _error(409, f"version {base} of {name} is in {chosen.state}: only a "
                         "production version can become the base; promote it first")
        targets, errors = await self.site_targets()
        if errors:
            raise _error(503, f"cannot tell which versions are in use: {errors[0]['error']}; "
                         "try again once every server answers")
        older = sorted({h.entry.version for h in holders if h.entry.version < base})
        in_use = {v: [t for t in targets if t.get("vdisk") == name and t.get("version") == v]
                  for v in older}
        removed, kept = [], []
        for version in older:
            if in_use[version]:
                kept.append({"version": version, "used_by": _who(in_use[version])})
                continue
            results = await self._everywhere(name, f"versions/{version}/delete", {})
            await self._settled(name, _without(version))
            removed.append({"version": version,
                            "ok": all(r.get("ok") is True for r in results), "results": results})
        log.info("admin_vdisk_merged", vdisk=name, base=base,
                 removed=[r["version"] for r in removed], kept=[k["version"] for k in kept],
                 peer=request.remote)
        return web.json_response({"vdisk": name, "base": base, "removed": removed,
                                  "kept": kept, "ok": all(r["ok"] for r in removed)})

    # -- this server's part -----------------------------------------------------------------

    async def _local_new(self, request: web.Request) -> web.Response:
        name = _name(request)
        body = await _body(request)
        number, start, created = body.get("version"), body.get("from"), body.get("created_ns")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (number, start, created)):
            raise _error(400, "version, from and created_ns must be whole numbers")
        assert isinstance(number, int) and isinstance(start, int) and isinstance(created, int)
        catalog = self.admin.server.catalog
        source = catalog.replica(name, start)
        if source is None or not source.servable:
            raise _error(409, f"{self.admin.config.name} has no good copy of version {start} "
                         f"of {name} to start from")
        bound = log.bind(vdisk=name, version=number, source=start)

        def progress(done: int, total: int) -> None:
            bound.info("version_copy_progress", done=done, total=total,
                       percent=round(100 * done / max(total, 1), 1))

        started = time.monotonic()
        try:
            identity = await asyncio.to_thread(
                make_version, source.path, source.store.path, name, number,
                VersionState.maintenance, created_ns=created, shared=source.store.shared,
                progress=progress,
            )
        except VersionFileError as error:
            raise _error(409, f"on {self.admin.config.name}: {error}") from None
        bound.info("version_made", identity=identity.short, state="maintenance",
                   seconds=round(time.monotonic() - started, 2),
                   hint=f"boot a maintenance device to change it, then pvsctl vdisk version "
                   f"promote {name}")
        deadline = time.monotonic() + PUBLISH_TIMEOUT
        while time.monotonic() < deadline:
            copy = catalog.replica(name, number)
            if copy is not None and copy.identity is not None:
                break
            await asyncio.sleep(0.1)
        return web.json_response({
            "server": self.admin.config.name, "ok": True, "vdisk": name, "version": number,
            "from": start, "state": "maintenance", "identity": identity.to_json(),
            "short": identity.short,
        })

    async def _local_state(self, request: web.Request) -> web.Response:
        name, number = _name(request), _version(request)
        body = await _body(request)
        state = body.get("state")
        if not isinstance(state, str) or state not in VersionState.__members__:
            raise _error(400, f"state must be one of {', '.join(VersionState.__members__)}")
        versions = self.admin.server.catalog.versions(name)
        if not versions:
            return web.json_response(self.admin.result(True, held=False))
        path = properties_path(versions[max(versions)].path)
        try:
            await asyncio.to_thread(set_version_state, path, number, VersionState(state))
        except OSError as error:
            raise _error(409, f"cannot write {path}: {error.strerror}; make the store "
                         "writable") from None
        log.info("version_state_saved", vdisk=name, version=number, state=state)
        return web.json_response(self.admin.result(True, held=True, state=state))

    async def _local_delete(self, request: web.Request) -> web.Response:
        name, number = _name(request), _version(request)
        copy = self.admin.server.catalog.replica(name, number)
        if copy is None:
            return web.json_response(self.admin.result(True, held=False))
        users = [s for s in self.admin.server.sessions if s.vdisk is copy]
        if users:
            raise _error(409, f"version {number} of {name} is in use on "
                         f"{self.admin.config.name} by {len(users)} target(s)")
        try:
            removed = await asyncio.to_thread(delete_version, copy.path, number)
        except OSError as error:
            raise _error(409, f"cannot delete {copy.path}: {error.strerror}") from None
        log.info("version_deleted", vdisk=name, version=number, files=removed)
        return web.json_response(self.admin.result(True, held=True, removed=removed))

    # -- helpers ----------------------------------------------------------------------------

    def _holders(self, name: str) -> list[Holder]:
        holders = [h for h in self.admin.holders() if h.entry.vdisk == name]
        if not holders:
            raise _error(404, f"no server of the site holds a vDisk named {name!r}; see "
                         "pvsctl vdisks")
        return holders

    async def _settled(
        self, name: str, done: Callable[[list[balance.VersionStatus]], bool]
    ) -> None:
        """Wait (bounded) until this server's view of the site shows a change made: the
        stores are polled and inventories sent within a second or so, and the next command
        an administrator types must see what this one did."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            holders = [h for h in self.admin.holders() if h.entry.vdisk == name]
            if done(self._statuses(name, holders)):
                return
            await asyncio.sleep(0.1)
        log.warning("admin_version_change_unseen", vdisk=name, seconds=SETTLE_TIMEOUT,
                    hint="a server has not reported the change yet; see pvsctl vdisk versions")

    @staticmethod
    def _statuses(name: str, holders: list[Holder]) -> list[balance.VersionStatus]:
        return balance.versions_of(views_of(holders), name)

    @staticmethod
    def _rows(holders: list[Holder], targets: list[JSON]) -> list[JSON]:
        rows = versions_report(holders)
        name = holders[0].entry.vdisk
        for row in rows:
            users = [t for t in targets if t.get("vdisk") == name
                     and t.get("version") == row["version"]]
            row["targets"] = len(users)
            row["devices"] = sorted(str(t.get("device_id")) for t in users)
        return rows

    async def site_targets(self) -> tuple[list[JSON], list[JSON]]:
        """The site's targets, and the servers that are up but did not say which they serve.
        A server declared down serves nobody (its targets have moved, or cannot reach it):
        it does not hold a version change back; it keeps what it had, and the least released
        state counts when it is back."""
        targets, errors = await self.admin.site_targets()
        return targets, [error for error in errors if not error.get("down")]

    async def _refuse_in_use(self, name: str, versions: list[int]) -> None:
        targets, errors = await self.site_targets()
        users = [t for t in targets if t.get("vdisk") == name and t.get("version") in versions]
        if users:
            raise _error(409, f"version {users[0].get('version')} of {name} is in use by "
                         f"{_who(users)}: it can be deleted once they log in again "
                         "elsewhere or shut down")
        if errors:
            raise _error(503, f"cannot tell whether version {versions[0]} is in use: "
                         f"{errors[0]['error']}; try again once every server answers")

    async def _everywhere(self, name: str, action: str, payload: JSON) -> list[JSON]:
        """Send a change to every up server (ourselves included); a server that is down is
        one failed result telling to repeat it."""
        path = f"/v1/local/vdisks/{name}/{action}"
        return await self.admin.everywhere("POST", path, json.dumps(payload).encode(), name)


def _name(request: web.Request) -> str:
    return vdisk_name(request)


def _version(request: web.Request) -> int:
    text = request.match_info["version"]
    if not text.isdigit() or len(text) > 10:
        raise _error(400, f"{text!r} is not a version number")
    return int(text)


async def _body(request: web.Request) -> JSON:
    return json_object(await request.read(), empty={})


def _without(version: int) -> Callable[[list[balance.VersionStatus]], bool]:
    return lambda rows: all(status.version != version for status in rows)


def _who(targets: list[JSON]) -> str:
    names = [f"{t.get('device_id')} (on {t.get('server')})" for t in targets[:5]]
    more = f" and {len(targets) - 5} more" if len(targets) > 5 else ""
    return ", ".join(names) + more


def _numbers(statuses: dict[int, Any]) -> str:
    return ", ".join(map(str, sorted(statuses))) or "none"


def _error(status: int, message: str) -> ApiError:
    return ApiError(status, message)
