"""The admin API of replication: copying a vDisk version from one server to others.

Site-wide (any server answers for the whole site):

- ``POST /v1/vdisks/{name}/replicate`` ``{"version": N, "to": ["s2"] | "all", "rate": B}``:
  picks the source and the destinations from the coordination view (`transfer.
  plan_replication`) and asks each destination to pull its copy; destinations that hold an
  identical copy already are reported so and skipped.
- ``GET /v1/replications[?vdisk=NAME]``: every copy running or finished on every server,
  and per version and server whether it is identical, damaged, missing or copying at x%.

This server's own part (``/v1/local/...``):

- ``POST /v1/local/replications``: pull a copy (`Replicator.replicate`);
- ``GET /v1/local/replications``: this server's copies and their progress;
- ``GET /v1/local/replicas/{name}/{version}[?digest=ROOT]``: what a receiver needs to know of
  our copy (identity, state, properties file, manifest size, and the size and SHA-256 of each
  of the version's boot files, `pvsd.boot`);
- ``GET .../manifest?digest=ROOT&offset=O&length=L``, ``GET .../blocks?...`` and
  ``GET .../boot/{vmlinuz|initrd|cmdline}?...``: bytes of our manifest file, of our image and
  of a boot file, at most `transfer.MAX_REQUEST` per request, never outside the file, and only
  while our copy still has the identity ``digest`` names;
- ``POST .../damage`` ``{"block": N}``: a receiver got block N wrong twice from us; we read
  it again (a confirmed mismatch makes our copy damaged, as a target's report does).

Every request is signed with the site key like every admin request (`pvsd.admin`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from aiohttp import web

from pvs_protocol import manifest as mf
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity
from pvs_protocol.modes import VersionState
from pvsd import boot
from pvsd import transfer as tr
from pvsd.admin_common import ApiError, json_object
from pvsd.balance import Replica, preferred_identity
from pvsd.manifest import ManifestFile
from pvsd.names import InvalidName, validate_name
from pvsd.properties import properties_path
from pvsd.replicator import ReplicationRefused, Replicator
from pvsd.store import ImageFile, VDisk
from pvsd.version_files import BootFileState, file_digest, find_boot_files

if TYPE_CHECKING:
    from pvsd.admin import AdminServer

log = structlog.get_logger("pvsd.admin")
JSON = dict[str, Any]
_T = TypeVar("_T")
FORWARD_TIMEOUT = 10.0
"""A destination checks its catalog and its free space before it answers."""
STATUS_TIMEOUT = 2.0
"""How long the site-wide list of copies waits for each server's part."""


class ReplicationApi:
    """The handlers; ``replicator`` is set by pvsd once its `Replicator` runs (without one,
    this server still serves its copies to others but takes none)."""

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.replicator: Replicator | None = None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/vdisks/{name}/replicate", self.replicate),
            web.get("/v1/replications", self.replications),
            web.post("/v1/local/replications", self.local_replicate),
            web.get("/v1/local/replications", self.local_replications),
            web.get("/v1/local/replicas/{name}/{version}", self.copy_info),
            web.get("/v1/local/replicas/{name}/{version}/manifest", self.manifest_bytes),
            web.get("/v1/local/replicas/{name}/{version}/blocks", self.image_bytes),
            web.get("/v1/local/replicas/{name}/{version}/boot/{file}", self.boot_bytes),
            web.post("/v1/local/replicas/{name}/{version}/damage", self.damage_report),
        ]

    @property
    def me(self) -> str:
        return self.admin.config.name

    # -- site-wide --------------------------------------------------------------------------

    async def replicate(self, request: web.Request) -> web.Response:
        name = _name(request.match_info["name"])
        version, to, rate = _replicate_body(await request.read())
        plan = tr.plan_replication(self._site_servers(name), name, version, to)
        if isinstance(plan, tr.Refused):
            raise ApiError(plan.status, plan.message)
        results: list[JSON] = [
            {"server": server, "ok": True, "state": "identical", "source": server == plan.source}
            for server in plan.identical
        ]
        results += [
            {"server": server, "ok": True, "state": "down",
             "note": f"{server} is down: left out; replicate to it once it is back"}
            for server in plan.down
        ]
        body = {"vdisk": name, "identity": plan.identity.to_json(), "source": plan.source,
                "rate": rate}
        async with asyncio.TaskGroup() as group:
            asks = [group.create_task(self._ask(server, body)) for server in plan.destinations]
        results += [task.result() for task in asks]
        refused = [r for r in results if not r.get("ok")]
        log.info("replication_requested", vdisk=name, version=plan.version,
                 identity=plan.identity.short, source=plan.source, peer=request.remote,
                 destinations=list(plan.destinations), refused=[r["server"] for r in refused])
        if plan.destinations and len(refused) == len(plan.destinations):
            raise ApiError(409, "; ".join(f"{r['server']}: {r['error']}" for r in refused))
        return web.json_response({
            "vdisk": name, "version": plan.version, "identity": plan.identity.to_json(),
            "short": plan.identity.short, "source": plan.source, "ok": not refused,
            "results": sorted(results, key=lambda r: str(r["server"])),
        })

    async def _ask(self, server: str, body: JSON) -> JSON:
        try:
            answer = await self.admin.ask(
                server, "POST", "/v1/local/replications", body, FORWARD_TIMEOUT
            )
        except ApiError as error:
            return {"server": server, "ok": False, "error": error.message}
        return {**answer, "server": server}

    async def replications(self, request: web.Request) -> web.Response:
        wanted = request.query.get("vdisk")
        if wanted is not None:
            wanted = _name(wanted)
        copies = self._replicator_status()
        errors: list[JSON] = []
        site = self.admin.server.site
        peers = sorted(p.name for p in (site.peers.values() if site is not None else ()) if p.up)
        async with asyncio.TaskGroup() as group:
            asks = [group.create_task(self._status_of(peer)) for peer in peers]
        for peer, task in zip(peers, asks, strict=True):
            found = task.result()
            if isinstance(found, str):
                errors.append({"server": peer, "error": found})
            else:
                copies += found
        if wanted is not None:
            copies = [c for c in copies if c.get("vdisk") == wanted]
        return web.json_response({
            "replications": copies, "versions": self._version_status(wanted, copies),
            "errors": errors,
        })

    async def _status_of(self, server: str) -> list[JSON] | str:
        try:
            answer = await self.admin.ask(
                server, "GET", "/v1/local/replications", {}, STATUS_TIMEOUT
            )
        except ApiError as error:
            return error.message
        found = answer.get("replications")
        if not isinstance(found, list):
            return f"{server} answered without a list of copies"
        return [c for c in found if isinstance(c, dict)]

    # -- this server's part: receiving ------------------------------------------------------

    async def local_replicate(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._replicate_here(_json(await request.read())))
        except ReplicationRefused as error:
            raise ApiError(error.status, error.message) from None

    def _replicate_here(self, body: Mapping[str, Any]) -> JSON:
        replicator = self.replicator
        if replicator is None:
            raise ReplicationRefused(503, f"{self.me} does not run replication (it is starting "
                                          "or stopping); try again in a moment")
        try:
            identity = ReplicaIdentity.from_json(dict(body["identity"]))
            name, source, rate = body["vdisk"], body["source"], body.get("rate")
        except (KeyError, TypeError, ValueError):
            raise ReplicationRefused(400, "body must hold vdisk, identity and source, as "
                                          "POST /v1/vdisks/NAME/replicate sends") from None
        if not isinstance(name, str) or not isinstance(source, str) or not _rate_ok(rate):
            raise ReplicationRefused(400, "vdisk and source must be names, rate bytes per "
                                          "second")
        try:
            return replicator.replicate(_name(name), identity, source, rate)
        except InvalidName as error:
            raise ReplicationRefused(400, str(error)) from None

    async def local_replications(self, request: web.Request) -> web.Response:
        return web.json_response({"server": self.me, "replications": self._replicator_status()})

    def _replicator_status(self) -> list[JSON]:
        return self.replicator.status() if self.replicator is not None else []

    # -- this server's part: serving a copy -------------------------------------------------

    async def copy_info(self, request: web.Request) -> web.Response:
        vdisk = self._served_copy(request)
        assert vdisk.identity is not None and vdisk.manifest is not None
        path = properties_path(vdisk.path)
        try:
            text: str | None = await self._blocking(path.read_text, "utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as error:
            raise ApiError(
                409, f"cannot read {path} on {self.me}: {error}; fix the file"
            ) from None
        shape = vdisk.manifest.shape
        return web.json_response({
            "server": self.me, "vdisk": vdisk.name, "version": vdisk.version,
            "identity": vdisk.identity.to_json(), "state": str(vdisk.state),
            "properties": text,
            "manifest_bytes": mf.HEADER_SIZE + sum(shape.counts) * DIGEST_SIZE,
            "boot_files": await self._blocking(_boot_files_info, vdisk),
        })

    async def manifest_bytes(self, request: web.Request) -> web.Response:
        vdisk = self._served_copy(request)
        manifest = vdisk.manifest
        assert manifest is not None
        size = mf.HEADER_SIZE + sum(manifest.shape.counts) * DIGEST_SIZE
        offset, length = _range(request, size, "manifest")
        data = await self._read(manifest, offset, length)
        return web.Response(body=data, content_type="application/octet-stream")

    async def image_bytes(self, request: web.Request) -> web.Response:
        vdisk = self._served_copy(request)
        offset, length = _range(request, vdisk.size, "image")
        data = await self._read(vdisk.file, offset, length)
        return web.Response(body=data, content_type="application/octet-stream")

    async def boot_bytes(self, request: web.Request) -> web.Response:
        """Bytes of one of the version's boot files (kernel, initramfs, arguments)."""
        vdisk = self._served_copy(request)
        state = await self._boot_file(vdisk, request.match_info["file"])
        offset, length = _range(request, state.size, str(state.path.name))
        assert state.real is not None
        try:
            data = await self._blocking(_read_range, state.real, offset, length)
        except OSError as error:
            raise ApiError(
                409, f"{self.me} could not read {state.path} ({error.strerror})"
            ) from None
        if len(data) != length:
            raise ApiError(409, f"{state.path} on {self.me} changed while it was copied; "
                                "replicate again")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _boot_file(self, vdisk: VDisk, text: str) -> BootFileState:
        if text not in tuple(boot.BootFile):
            raise ApiError(404, f"no boot file {text[:40]!r}: vmlinuz, initrd or cmdline")
        files = await self._blocking(find_boot_files, vdisk.path, vdisk.store.path)
        state = files[boot.BootFile(text)]
        if state.real is None:
            raise ApiError(404, state.problem or f"{self.me} has no {state.path.name}")
        return state

    async def damage_report(self, request: web.Request) -> web.Response:
        """A receiver got a block twice that does not match our manifest: read it again here
        (the catalog's re-check; a confirmed mismatch withdraws our copy)."""
        name, version = _name(request.match_info["name"]), _version(request)
        block = _json(await request.read()).get("block")
        vdisk = self.admin.server.catalog.replica(name, version)
        if vdisk is None:
            raise ApiError(404, f"{self.me} holds no version {version} of {name}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 0:
            raise ApiError(400, 'send {"block": N}, the number of the bad block')
        started = self.admin.server.catalog.report_damage(
            vdisk, block, reporter=f"replication ({request.remote})"
        )
        log.warning("replication_damage_reported", vdisk=name, version=version, block=block,
                    peer=request.remote, recheck=started)
        return web.json_response({"server": self.me, "ok": True, "recheck": started})

    async def _read(self, file: ImageFile | ManifestFile, offset: int, length: int) -> bytes:
        """The worker thread holds ``file`` (not just its descriptor) until its read returns:
        the descriptor stays open even if the catalog drops the file or the client leaves."""
        try:
            data = await self._blocking(_pread, file, length, offset)
        except OSError as error:
            raise ApiError(409, f"{self.me} could not read its copy ({error.strerror}); "
                                    "replicate from another server") from None
        if len(data) != length:
            raise ApiError(409, f"{self.me}'s copy is shorter than it should be; replicate "
                                    "from another server")
        return data

    def _served_copy(self, request: web.Request) -> VDisk:
        name, version = _name(request.match_info["name"]), _version(request)
        vdisk = self.admin.server.catalog.replica(name, version)
        if vdisk is None:
            raise ApiError(404, f"{self.me} holds no version {version} of {name}; see "
                                    "pvsctl vdisks")
        if vdisk.damage is not None:
            raise ApiError(409, f"{self.me}'s copy of {name} version {version} is damaged: "
                                    "replicate from a server with a good copy")
        if vdisk.identity is None or vdisk.manifest is None:
            raise ApiError(409, f"{self.me} is checking its copy of {name} version "
                                    f"{version} now; try again once it is done")
        if vdisk.writer:
            raise ApiError(409, f"a target writes {name} version {version} through "
                                    f"{self.me} now: it cannot be copied until it is released")
        digest = request.query.get("digest")
        if digest is not None and digest != vdisk.identity.digest.hex():
            raise ApiError(409, f"{self.me} holds {vdisk.identity.short} of {name} now, not "
                                    "the copy asked for; replicate again")
        return vdisk

    async def _blocking(self, function: Callable[..., _T], *args: Any) -> _T:
        if self.replicator is not None:
            return await self.replicator.blocking(function, *args)
        return await asyncio.to_thread(function, *args)

    # -- the site as replication sees it ----------------------------------------------------

    def _site_servers(self, vdisk: str) -> list[tr.SiteServer]:
        site = self.admin.server.site
        servers = []
        for view in self.admin.server.view():
            peer = site.peers.get(view.name) if site is not None else None
            up = view.name == self.me or (peer is not None and peer.up)
            copies = {
                number: tr.Copy(replica.identity, replica.damaged,
                                replica.state is VersionState.maintenance)
                for number, replica in view.replicas.get(vdisk, {}).items()
            }
            servers.append(tr.SiteServer(view.name, up, view.serving, view.load, copies))
        return servers

    def _version_status(self, wanted: str | None, copies: list[JSON]) -> list[JSON]:
        """Per vDisk, version and server: identical, different, damaged, checking, copying
        (with its percent), failed (a copy that stopped) or missing."""
        views = self.admin.server.view()
        site = self.admin.server.site
        names = sorted({n for v in views for n in v.replicas if wanted in (None, n)})
        running = {(c.get("server"), c.get("vdisk"), c.get("version")): c for c in copies}
        report = []
        for name in names:
            numbers = sorted({n for v in views for n in v.replicas.get(name, {})}, reverse=True)
            for number in numbers:
                held = [(v, v.replicas.get(name, {}).get(number)) for v in views]
                reference = preferred_identity(
                    r.identity for v, r in held if r is not None and r.candidate and v.serving
                ) or preferred_identity(r.identity for _v, r in held if r is not None and
                                        r.candidate)
                servers = []
                for view, replica in sorted(held, key=lambda pair: pair[0].name):
                    peer = site.peers.get(view.name) if site is not None else None
                    up = view.name == self.me or (peer is not None and peer.up)
                    entry = running.get((view.name, name, number))
                    servers.append(_server_status(view.name, up, replica, reference, entry))
                report.append({
                    "vdisk": name, "version": number,
                    "reference": reference.to_json() if reference is not None else None,
                    "short": reference.short if reference is not None else None,
                    "servers": servers,
                })
        return report


def _server_status(
    server: str, up: bool, replica: Replica | None, reference: ReplicaIdentity | None,
    copy: JSON | None,
) -> JSON:
    status: JSON = {"server": server, "up": up, "percent": None, "error": None,
                    "short": replica.identity.short if replica is not None and
                    replica.identity is not None else None}
    if copy is not None and copy.get("state") == str(tr.State.COPYING):
        return status | {"status": "copying", "percent": copy.get("percent"),
                         "seconds_left": copy.get("seconds_left"), "rate": copy.get("rate")}
    if replica is not None:
        if replica.damaged:
            return status | {"status": "damaged"}
        if replica.identity is None:
            return status | {"status": "checking"}
        return status | {"status": "identical" if replica.identity == reference else "different"}
    if copy is not None and copy.get("state") == str(tr.State.FAILED):
        return status | {"status": "failed", "error": copy.get("error")}
    return status | {"status": "missing"}


# -- parsing requests -----------------------------------------------------------------------


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except InvalidName as error:
        raise ApiError(400, str(error)) from None


def _pread(file: ImageFile | ManifestFile, length: int, offset: int) -> bytes:
    return os.pread(file.fd, length, offset)


def _read_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as handle:
        return os.pread(handle.fileno(), length, offset)


def _boot_files_info(vdisk: VDisk) -> dict[str, JSON]:
    """The version's boot files a receiver copies along: size and SHA-256 of each one that
    can be served (one that cannot is left out, as the boot listener leaves it out)."""
    info = {}
    for kind, state in find_boot_files(vdisk.path, vdisk.store.path).items():
        if state.real is not None:
            try:
                info[str(kind)] = {"size": state.size, "sha256": file_digest(state.real)}
            except OSError:
                continue
    return info


def _version(request: web.Request) -> int:
    text = request.match_info["version"]
    if not text.isdigit() or len(text) > 10:
        raise ApiError(400, f"version {text!r} is not a version number")
    return int(text)


def _json(body: bytes) -> JSON:
    return json_object(body)


def _replicate_body(body: bytes) -> tuple[int | None, list[str] | None, float | None]:
    """Version (None: the newest), destinations (None: all) and rate (None: the receivers'
    configured replication_rate) of a replicate request."""
    data = _json(body)
    example = ' e.g. {"to": ["s2"], "version": 2, "rate": 52428800} or {"to": "all"}'
    unknown = sorted(set(data) - {"version", "to", "rate"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)};{example}")
    version, to, rate = data.get("version"), data.get("to"), data.get("rate")
    if version is not None and (
        not isinstance(version, int) or isinstance(version, bool) or version < 0
    ):
        raise ApiError(400, f"version must be a version number;{example}")
    if to == "all":
        destinations = None
    elif isinstance(to, list) and to and all(isinstance(s, str) and s for s in to):
        destinations = list(to)
    else:
        raise ApiError(400, f"to must list server names, or be \"all\";{example}")
    if not _rate_ok(rate):
        raise ApiError(400, f"rate must be bytes per second, 0 for no limit;{example}")
    return version, destinations, float(rate) if rate is not None else None


def _rate_ok(rate: object) -> bool:
    return rate is None or (
        isinstance(rate, int | float) and not isinstance(rate, bool) and 0 <= rate < 1e15
    )


def _range(request: web.Request, size: int, what: str) -> tuple[int, int]:
    """The ``offset`` and ``length`` asked for, refused if outside the file or too large."""
    try:
        offset, length = int(request.query["offset"]), int(request.query["length"])
    except (KeyError, ValueError):
        raise ApiError(400, "give offset and length as whole numbers of bytes") from None
    if length > tr.MAX_REQUEST:
        raise ApiError(413, f"at most {tr.MAX_REQUEST} bytes per request; ask for less")
    if offset < 0 or length <= 0 or offset + length > size:
        raise ApiError(416, f"bytes {offset}..{offset + length} are outside the {what} "
                                f"({size} bytes)")
    return offset, length
