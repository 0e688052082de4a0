"""The admin API: HTTP + JSON, answered by any server of the site for the whole site.

Site-wide reads (servers, vDisk replication) come from the coordination view this server
already holds; targets and changes need every server, so they are fetched from or forwarded to
each up peer's ``/v1/local/...`` endpoint, concurrently and with a short timeout. A peer that
does not answer becomes one error entry: a site-wide request never fails because of one server.

Every request is signed with the site key for the server it is sent to (`pvsd.admin_auth`);
forwarded ones are signed anew by the forwarding server. With TLS (`pvsd.tls`) the servers
also check each other's certificates against the site CA. Every change is audited
(`pvsd.audit`). Every refusal is a 4xx JSON ``{"error": ...}`` that says what to do,
logged with the client's address; a bug in a handler is a 500 with no traceback to the client.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import ipaddress
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from pvs_protocol import coordination as co
from pvs_protocol import manifest as mf
from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.modes import Mode, SubnetAffinity
from pvsd import admin_auth, audit, listening
from pvsd.admin_common import ApiError, HostNames, parse_json, vdisk_name
from pvsd.admin_rebalance import RebalanceApi
from pvsd.admin_replication import ReplicationApi
from pvsd.admin_servers import ServersApi
from pvsd.admin_versions import VersionsApi
from pvsd.config import Config, format_address, parse_address
from pvsd.manifest import manifest_path, write_manifest
from pvsd.metrics import MetricsApi
from pvsd.properties import (
    PropertiesError,
    VDiskProperties,
    load_properties,
    properties_path,
    save_properties,
)
from pvsd.replication import Holder, replication_report
from pvsd.server import StreamServer
from pvsd.site import Peer
from pvsd.store import VDisk
from pvsd.tls import AdminTls, PeerTransport, TlsError
from pvsd.versions import key_of

log = structlog.get_logger("pvsd.admin")

PEER_TIMEOUT = 2.0
"""How long a site-wide request waits for each peer's part."""
MAX_BODY = 64 * 1024
SETTABLE = (
    "mode", "maintenance", "load_balancing", "fixed_server", "subnet_affinity", "description",
    "version", "test_devices", "maintenance_devices",
)
FORCE = "force"
"""Sent with a change that would cut off streaming targets: do it anyway."""
MANIFEST_TIME = "manifest_created_ns"
"""Sent along with a new version by the server that forwards it: the creation time of the
re-stamped manifest, the same on every server."""
JSON = dict[str, Any]


class PeerError(Exception):
    """A peer's part of a site-wide request failed; the message names the peer and the cause.
    ``status`` is the peer's HTTP status when it refused (0: it could not be reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AdminServer:
    def __init__(self, config: Config, server: StreamServer) -> None:
        self.config = config
        self.server = server
        self.address = config.admin
        self.requests = 0
        self.auth_failures: Counter[str] = Counter()
        self.bad_requests = 0
        self._seen = admin_auth.ReplayCache()
        self.key_id = admin_auth.key_id(config.site_key)
        self._host_names = HostNames()
        self._peers = PeerTransport()
        """Plain HTTP until `start` has loaded the TLS files, if any."""
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._settings_lock = asyncio.Lock()
        self.versions = VersionsApi(self)
        self.replication = ReplicationApi(self)
        self.rebalance = RebalanceApi(self)
        self.servers = ServersApi(self)
        self.metrics = MetricsApi(self)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; only once this returns is the admin API started."""
        if not self.config.site_key:
            log.error(
                "admin_not_started", reason="no site key to authenticate requests with",
                hint="give --key-file FILE (make one with 'pvsctl site keygen'), or --admin off",
            )
            return
        try:
            tls = AdminTls.from_config(self.config)
            server_tls = tls.server_context() if tls is not None else None
            peers = PeerTransport(tls.client_context() if tls is not None else None)
        except TlsError as error:
            log.error(
                "admin_tls_unusable", error=str(error),
                action="fix admin_tls_cert, admin_tls_key and admin_tls_ca (pvsctl site certs "
                "makes them), or remove all three to serve plain HTTP",
            )
            raise OSError(f"admin API TLS: {error}") from None
        app = web.Application(
            middlewares=[
                self._error_middleware(), self._auth_middleware(), self._audit_middleware(),
            ],
            client_max_size=MAX_BODY,
        )
        app.add_routes([
            web.get("/v1/servers", self._servers),
            web.get("/v1/vdisks", self._vdisks),
            web.get("/v1/targets", self._targets),
            web.get("/v1/site", self._site),
            web.post("/v1/vdisks/{name}/settings", self._settings),
            web.post("/v1/servers/{name}/stop-stream", self._stream),
            web.post("/v1/servers/{name}/start-stream", self._stream),
            web.get("/v1/local/targets", self._local_targets),
            web.get("/v1/local/vdisks", self._local_vdisks),
            web.post("/v1/local/vdisks/{name}/settings", self._local_settings),
            web.post("/v1/local/stop-stream", self._local_stream),
            web.post("/v1/local/start-stream", self._local_stream),
            *self.versions.routes(),
            *self.replication.routes(),
            *self.rebalance.routes(),
            *self.servers.routes(),
            *self.metrics.routes(),
        ])
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        self.address = await listening.start(
            runner,
            lambda ready: web.TCPSite(
                ready, self.config.admin_host, self.config.admin_port, reuse_address=True,
                ssl_context=server_tls,
            ),
            f"the admin API on {self.config.admin}", "--admin HOST:PORT",
        )
        self._runner = runner
        self._peers = peers
        self._client = aiohttp.ClientSession()
        log.info("admin_listening", address=self.address, tls=server_tls is not None,
                 key_id=self.key_id)

    async def close(self) -> None:
        runner, client = self._runner, self._client
        self._runner = self._client = None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            if client is not None:
                await client.close()

    # -- middleware -------------------------------------------------------------------------

    def _error_middleware(self) -> Middleware:
        @web.middleware
        async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except ApiError as error:
                status, message = error.status, error.message
            except web.HTTPException as error:
                if error.status < 400:
                    raise
                status, message = error.status, _http_error_message(request, error)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "admin_internal_error", peer=request.remote, method=request.method,
                    path=request.path,
                )
                return _error(500, "internal error in pvsd; the server log has the details "
                              "(event admin_internal_error)")
            if status == 401:
                return _error(status, message, {"WWW-Authenticate": admin_auth.SCHEME})
            self.bad_requests += 1
            log.warning(
                "admin_bad_request", peer=request.remote, method=request.method,
                path=request.path, status=status, error=message,
            )
            return _error(status, message)

        return errors

    def _auth_middleware(self) -> Middleware:
        @web.middleware
        async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.metrics.is_open(request):  # Prometheus cannot sign (pvsd.metrics)
                return await handler(request)
            body = await request.read()
            host = request.headers.get("Host", "")
            try:
                await self._authenticate(request, host, body)
            except admin_auth.AuthError as error:
                self.auth_failures[error.reason] += 1
                log.warning(
                    "admin_auth_failed", peer=request.remote, method=request.method,
                    path=request.path, host=host[:100], reason=error.reason,
                    error=error.detail, failures=sum(self.auth_failures.values()),
                )
                hint = "; use the site key of this site (pvsctl --key-file FILE)"
                if error.reason in ("stale", "replayed", "busy", "wrong_server", "malformed"):
                    hint = ""
                raise ApiError(401, f"not authenticated: {error.detail}{hint}") from None
            self.requests += 1
            if request.method in admin_auth.MUTATING_METHODS:
                parse_json(body)  # every endpoint: a body no handler could use is a 400
            return await handler(request)

        return authenticate

    async def _authenticate(self, request: web.Request, host: str, body: bytes) -> None:
        """`admin_auth`'s checks, with the one that needs I/O between them: whether the
        request was meant for this server (a host name is resolved, once its MAC is good)."""
        try:
            target = admin_auth.target(host, default_port=443 if request.secure else 80)
        except ValueError:
            target = ""  # refused by authenticate, after the Authorization header's form
        now = _now_ms()
        signed = admin_auth.authenticate(
            self.config.site_key, request.headers.get("Authorization"), request.method, target,
            request.raw_path, body, now,
        )
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        here = False
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            local = (str(sockname[0]), int(sockname[1]))
            here = admin_auth.names_this_server(signed.target, local)
            name = admin_auth.split_target(signed.target)[0]
            if not here and not admin_auth.is_ip_literal(name):
                resolved = await self._host_names.addresses(name)
                here = admin_auth.names_this_server(signed.target, local, resolved)
        if not here:
            raise admin_auth.wrong_server(signed, f"{self.config.name} at {self.address}")
        admin_auth.remember(signed, request.method, self._seen, now)

    def _audit_middleware(self) -> Middleware:
        """The audit line of every authenticated change, whatever came of it (`pvsd.audit`)."""

        @web.middleware
        async def audited(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method not in admin_auth.MUTATING_METHODS:
                return await handler(request)
            body = await request.read()
            try:
                response = await handler(request)
            except ApiError as error:
                audit.record(request, self.key_id, body, error.status, error=error.message)
                raise
            except web.HTTPException as error:
                if error.status >= 400:
                    audit.record(request, self.key_id, body, error.status, error=error.reason)
                raise
            except asyncio.CancelledError:
                audit.record(request, self.key_id, body, 503, error="cancelled: pvsd stops")
                raise
            except Exception:
                audit.record(request, self.key_id, body, 500, error="internal error")
                raise
            audit.record(
                request, self.key_id, body, response.status, audit.answer_of(response)
            )
            return response

        return audited

    # -- site-wide endpoints ----------------------------------------------------------------

    async def _servers(self, request: web.Request) -> web.Response:
        return web.json_response({"servers": self.servers_report()})

    async def _vdisks(self, request: web.Request) -> web.Response:
        """The coordination view gives every copy's status at once; each up server adds what
        only it knows of its copies (what found a damage and when, scrub progress). A peer
        that does not answer costs its detail and one error entry, never the status."""
        local: dict[str, JSON] = {self.config.name: self.local_vdisks()}
        errors: list[JSON] = []
        answers = await self._fan_out("GET", "/v1/local/vdisks", None, PEER_TIMEOUT)
        for name, address, answer in answers:
            vdisks = answer.get("vdisks") if not isinstance(answer, PeerError) else None
            if isinstance(vdisks, dict):
                local[name] = vdisks
            else:
                errors.append({"server": name, "admin_address": address, "error": str(answer)})
        report = replication_report(self.holders(local))
        return web.json_response({"vdisks": report, "errors": errors})

    async def _targets(self, request: web.Request) -> web.Response:
        targets, errors = await self.site_targets()
        return web.json_response({"targets": targets, "errors": errors})

    async def site_targets(self) -> tuple[list[JSON], list[JSON]]:
        """Every streaming target of the site, and one error per server that did not say."""
        targets = await self.fresh_local_targets()
        errors: list[JSON] = []
        answers = await self._fan_out("GET", "/v1/local/targets", None, PEER_TIMEOUT)
        for name, address, answer in answers:
            if isinstance(answer, PeerError):
                errors.append({"server": name, "admin_address": address, "error": str(answer)})
            else:
                targets += [t for t in answer.get("targets", []) if isinstance(t, dict)]
        site = self.server.site
        for peer in site.peers.values() if site is not None else ():
            if not peer.up:
                errors.append({
                    "server": peer.name, "admin_address": peer.admin_address or "",
                    "error": f"{peer.name} is down (not heard for {_silent_for(peer):.0f} s)",
                    "down": True,
                })
        targets.sort(key=lambda t: (str(t.get("server")), str(t.get("device_id"))))
        return targets, errors

    async def _site(self, request: web.Request) -> web.Response:
        site = self.server.site
        peers = list(site.peers.values()) if site is not None else []
        return web.json_response({
            "name": self.config.name,
            "version": _version(),
            "stream_address": self.server.advertised,
            "admin_address": self.address,
            "state": self.server.state.value,
            "site": site is not None,
            "coordination": {
                "received": site.received if site is not None else 0,
                "dropped": dict(site.dropped) if site is not None else {},
                "peers": len(peers),
                "peers_up": sum(1 for p in peers if p.up),
            },
            "admin": {
                "requests": self.requests,
                "bad_requests": self.bad_requests,
                "auth_failures": sum(self.auth_failures.values()),
                "auth_failures_by_reason": dict(self.auth_failures),
            },
        })

    async def _settings(self, request: web.Request) -> web.Response:
        name = vdisk_name(request)
        body = await request.read()
        changes = parse_changes(body)
        force = changes.pop(FORCE, False) is True
        if "version" in changes and MANIFEST_TIME not in changes:
            # One creation time for every server: copies that had one manifest get one new
            # manifest (the same root), not one each.
            changes[MANIFEST_TIME] = time.time_ns()
        body = json.dumps(changes).encode()
        base = self._known_properties(name)
        try:
            VDiskProperties.from_mapping(base.to_mapping() | _properties_part(changes))
        except PropertiesError as error:
            raise ApiError(400, f"cannot change vDisk {name}: {error}") from None
        cuts = cuts_off(base, changes)
        if cuts and not force:
            targets, _errors = await self.site_targets()
            users = [t for t in targets if t.get("vdisk") == name]
            if users:
                who = ", ".join(f"{t.get('device_id')} (on {t.get('server')})" for t in users[:8])
                raise ApiError(
                    409, f"changing {' and '.join(cuts)} of {name} would cut off "
                    f"{len(users)} streaming target(s): {who}"
                    + (f" and {len(users) - 8} more" if len(users) > 8 else "")
                    + "; shut them down or move them first, or repeat with --force",
                )
        fixed = changes.get("fixed_server")
        known = self._server_names()
        if isinstance(fixed, str) and fixed and fixed not in known:
            raise ApiError(
                400, f"fixed_server {fixed!r} is not a server of this site; known servers: "
                f"{', '.join(sorted(known))}",
            )
        results: list[JSON] = []
        if self.server.catalog.versions(name):
            try:
                results.append(await self.apply_settings(name, changes))
            except ApiError as error:
                results.append(self.result(False, error=error.message))
        results += await self._peer_results(
            "POST", f"/v1/local/vdisks/{name}/settings", body, name,
            "set it again once it is back, or it keeps its old settings",
        )
        ok = all(result.get("ok") is True for result in results)
        log.info("admin_vdisk_settings", vdisk=name, changes=changes, peer=request.remote, ok=ok)
        audit.note(request, **audit.settings_before_after(results))
        return web.json_response({"vdisk": name, "changes": changes, "ok": ok, "results": results})

    async def _stream(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        action = "stop" if request.path.endswith("/stop-stream") else "start"
        log.info("admin_stream_request", server=name, action=action, peer=request.remote)
        if name == self.config.name:
            return web.json_response(await self.change_stream(action))
        site = self.server.site
        peer = site.peers.get(name) if site is not None else None
        if peer is None:
            raise ApiError(
                404, f"no server named {name!r} in this site; known servers: "
                f"{', '.join(sorted(self._server_names()))} (see pvsctl servers)",
            )
        if not peer.up:
            raise ApiError(
                503, f"{name} is down (not heard for {_silent_for(peer):.0f} s): it cannot be "
                "told anything; check that its pvsd runs",
            )
        timeout = self.config.drain_timeout + 5.0
        try:
            answer = await self._peer_request(
                peer, "POST", f"/v1/local/{action}-stream", b"", timeout
            )
        except PeerError as error:
            raise ApiError(502, str(error)) from None
        return web.json_response(answer)

    # -- this server's own part -------------------------------------------------------------

    async def _local_targets(self, request: web.Request) -> web.Response:
        return web.json_response({"targets": await self.fresh_local_targets()})

    async def fresh_local_targets(self) -> list[JSON]:
        """``local_targets`` with the stream workers' latest byte counts."""
        if self.server.workers is not None:
            await self.server.workers.refresh()
        return self.local_targets()

    async def _local_vdisks(self, request: web.Request) -> web.Response:
        return web.json_response({"server": self.config.name, "vdisks": self.local_vdisks()})

    async def _local_settings(self, request: web.Request) -> web.Response:
        name = vdisk_name(request)
        changes = parse_changes(await request.read())
        if name not in self.server.catalog:
            return web.json_response(self.result(True, held=False))
        result = await self.apply_settings(name, changes)
        audit.note(request, **audit.settings_before_after([result]))
        return web.json_response(result)

    async def _local_stream(self, request: web.Request) -> web.Response:
        action = "stop" if request.path.endswith("/stop-stream") else "start"
        log.info(
            "admin_stream_request", server=self.config.name, action=action, peer=request.remote
        )
        return web.json_response(await self.change_stream(action))

    async def change_stream(self, action: str) -> JSON:
        targets = sum(1 for session in self.server.sessions if session.streaming)
        if action == "stop":
            await self.server.stop_stream()
        else:
            await self.server.start_stream()
        return {
            "server": self.config.name, "ok": True, "state": self.server.state.value,
            "targets_before": targets,
        }

    async def apply_settings(self, name: str, changes: JSON) -> JSON:
        """Save the changed settings beside our replica; the store watcher picks them up."""
        versions = self.server.catalog.versions(name)
        if not versions:
            return self.result(True, held=False)
        vdisk = versions[max(versions)]
        if "version" in changes and (len(versions) > 1 or vdisk.file_version is not None):
            raise ApiError(
                409, f"{name} on {self.config.name} has versions of its own (NAME@N.img): "
                f"make a new one with 'pvsctl vdisk version new {name}' instead of renumbering",
            )
        path = properties_path(vdisk.path)
        manifest: ReplicaIdentity | None = None
        async with self._settings_lock:
            try:
                current = load_properties(path)
                updated = VDiskProperties.from_mapping(
                    current.to_mapping() | _properties_part(changes)
                )
            except PropertiesError as error:
                raise ApiError(
                    400, f"cannot change vDisk {name} on {self.config.name}: {error}"
                ) from None
            if "version" in changes:
                created_ns = changes.get(MANIFEST_TIME)
                manifest = await asyncio.to_thread(
                    self._restamp, vdisk.path, updated.version,
                    created_ns if isinstance(created_ns, int) else time.time_ns(),
                )
            changed = updated != current or manifest is not None
            if updated != current:
                try:
                    await asyncio.to_thread(save_properties, path, updated)
                except OSError as error:
                    raise ApiError(
                        409, f"cannot write {path} on {self.config.name}: {error.strerror}; "
                        "make the store writable",
                    ) from None
        if changed:
            log.info("vdisk_settings_saved", vdisk=name, path=str(path), changes=changes,
                     manifest=manifest.short if manifest is not None else None)
            await self._in_force(name, updated)
        return self.result(
            True, held=True, changed=changed, shared=vdisk.store.shared,
            properties=updated.to_mapping(), properties_before=current.to_mapping(),
            manifest=manifest.to_json() if manifest is not None else None,
        )

    async def _in_force(self, name: str, updated: VDiskProperties) -> None:
        """Wait (bounded) until the store watcher has read the saved file: once `vdisk set`
        answers, the next login already follows the new settings."""
        deadline = time.monotonic() + max(5.0, 5 * self.config.watch_interval)
        while time.monotonic() < deadline:
            versions = self.server.catalog.versions(name)
            if not versions or all(v.properties == updated for v in versions.values()):
                return
            await asyncio.sleep(0.05)

    def _restamp(self, image: Path, version: int, created_ns: int) -> ReplicaIdentity | None:
        """A new version of the same bytes: the manifest's digests under a new version and
        creation time (no pass over the image). None if the image has no manifest yet (pvsd
        adopts it with the properties' version)."""
        path = manifest_path(image)
        try:
            manifest = mf.Manifest.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, mf.ManifestError) as error:
            raise ApiError(
                409, f"cannot make version {version} of {image.stem} on {self.config.name}: "
                f"{path}: {error}; copy a good image and manifest there, or make a new one with "
                "pvsctl vdisk manifest",
            ) from None
        restamped = manifest.restamped(version, created_ns)
        try:
            write_manifest(image, restamped)
        except OSError as error:
            raise ApiError(
                409, f"cannot write {path} on {self.config.name}: {error.strerror}; make the "
                "store writable",
            ) from None
        return restamped.identity

    def result(self, ok: bool, **fields: Any) -> JSON:
        return {"server": self.config.name, "ok": ok, **fields}

    async def ask(
        self, server: str, method: str, path: str, payload: JSON, timeout: float
    ) -> JSON:
        """One server's answer to a local request, ourselves included; its refusal becomes
        ours (409 with its message), its silence a 502 naming it."""
        body = json.dumps(payload).encode()
        if server == self.config.name:
            try:
                return await self._self_request(method, path, body, timeout)
            except PeerError as error:
                status = error.status if 400 <= error.status < 500 else 502
                raise ApiError(status, str(error)) from None
        site = self.server.site
        peer = site.peers.get(server) if site is not None else None
        if peer is None or not peer.up:
            raise ApiError(503, f"{server} is not up: it cannot be asked; check its pvsd")
        try:
            return await self._peer_request(peer, method, path, body, timeout)
        except PeerError as error:
            raise ApiError(error.status if 400 <= error.status < 500 else 502, str(error)) from None

    async def everywhere(self, method: str, path: str, body: bytes, vdisk: str) -> list[JSON]:
        """A local request on every up server, ourselves first; each down server that holds
        ``vdisk`` is one failed result saying to repeat the change once it is back."""
        results: list[JSON] = []
        try:
            results.append(await self._self_request(method, path, body, PEER_TIMEOUT * 2))
        except PeerError as error:
            results.append(self.result(False, error=str(error)))
        return results + await self._peer_results(
            method, path, body, vdisk, "repeat this once it is back, or it keeps what it had"
        )

    async def _peer_results(
        self, method: str, path: str, body: bytes, vdisk: str, when_back: str
    ) -> list[JSON]:
        """Each up peer's answer to a local change (or the error it came to), then one failed
        result per down peer holding ``vdisk``, saying ``when_back``."""
        results: list[JSON] = []
        for server, address, answer in await self._fan_out(method, path, body, PEER_TIMEOUT * 2):
            if isinstance(answer, PeerError):
                results.append(
                    {"server": server, "admin_address": address, "ok": False, "error": str(answer)}
                )
            else:
                results.append(answer)
        site = self.server.site
        for peer in site.peers.values() if site is not None else ():
            if not peer.up and _holds(peer, vdisk):
                results.append({
                    "server": peer.name, "ok": False, "held": True,
                    "error": f"{peer.name} is down: {when_back}",
                })
        return results

    async def _self_request(self, method: str, path: str, body: bytes, timeout: float) -> JSON:
        """Our own local endpoint, over HTTP like a peer's: one path for every server's part
        of a change, with the same checks and the same answers."""
        host, port = parse_address(self.address)
        if _is_ip(host) and ipaddress.ip_address(host).is_unspecified:
            host = "::1" if ":" in host else "127.0.0.1"
        address = format_address(host, port)
        return await self._request(self.config.name, address, method, path, body, timeout)

    def local_targets(self) -> list[JSON]:
        now = time.time()
        targets = []
        for session in self.server.sessions:
            if not session.streaming or session.vdisk is None:
                continue
            targets.append({
                "device_id": session.device_id,
                "vdisk": session.vdisk.name,
                "version": session.vdisk.version,
                "identity": session.identity.short if session.identity is not None else None,
                "session": f"{session.session_id:016x}",
                "address": session.peer,
                "target_ip": session.peer_ip,
                "since": datetime.datetime.fromtimestamp(session.since, datetime.UTC).isoformat(
                    timespec="seconds"
                ),
                "seconds": round(now - session.since, 1),
                "bytes_read": session.bytes_read,
                "bytes_written": session.bytes_written,
                "server": self.config.name,
                "server_address": self.server.advertised,
                "server_ip": _host(session.local_address),
            })
        return targets

    # -- the site as we see it --------------------------------------------------------------

    def servers_report(self) -> list[JSON]:
        state = self.server.local_state()
        servers: list[JSON] = [{
            "name": self.config.name, "self": True, "heard": True,
            "stream_address": self.server.advertised, "admin_address": self.address,
            "state": self.server.state.value, "up": True, "power": self.config.power,
            "targets": state.targets, "load": round(state.targets / self.config.power, 3),
            "bytes_per_second": state.bytes_per_second, "last_heard_seconds": 0.0,
            "vdisks": len(state.replicas),
        }]
        site = self.server.site
        if site is None:
            return servers
        for peer in sorted(site.peers.values(), key=lambda p: p.name):
            beat = peer.heartbeat
            servers.append({
                "name": peer.name, "self": False, "heard": True,
                "stream_address": beat.stream_address, "admin_address": peer.admin_address or "",
                "state": _peer_state(peer), "up": peer.up, "power": beat.power,
                "targets": beat.targets, "load": round(beat.targets / (beat.power or 1.0), 3),
                "bytes_per_second": beat.bytes_per_second,
                "last_heard_seconds": round(_silent_for(peer), 1),
                "vdisks": len(peer.inventory),
            })
        heard = {p.heartbeat.stream_address for p in site.peers.values()}
        heard |= {format_address(str(p.source[0]), int(p.source[1])) for p in site.peers.values()}
        for address in self.config.peers:
            if address not in heard:
                servers.append({
                    "name": None, "self": False, "heard": False, "stream_address": address,
                    "admin_address": "", "state": "down", "up": False, "power": None,
                    "targets": None, "load": None, "bytes_per_second": None,
                    "last_heard_seconds": None, "vdisks": None,
                })
        return servers

    def local_vdisks(self) -> dict[str, JSON]:
        """What only this server knows of its copies: damage detail and scrub progress."""
        return {
            key_of(vdisk.name, vdisk.version): {
                "damage": damage_json(vdisk), "scrub": scrub_json(vdisk),
            }
            for vdisk in self.server.catalog.values()
        }

    def holders(self, local: dict[str, JSON] | None = None) -> list[Holder]:
        local = local or {}

        def detail(server: str, entry: co.ReplicaEntry) -> JSON | None:
            value = local.get(server, {}).get(key_of(entry.vdisk, entry.version))
            return value if isinstance(value, dict) else None

        name = self.config.name
        holders = [
            Holder(name, self.server.state.value, entry, True, detail(name, entry))
            for entry in self.server.local_state().replicas.values()
        ]
        site = self.server.site
        for peer in site.peers.values() if site is not None else ():
            state = _peer_state(peer)
            holders += [
                Holder(peer.name, state, entry, False, detail(peer.name, entry))
                for entry in peer.inventory.values()
            ]
        return holders

    def _known_properties(self, name: str) -> VDiskProperties:
        """The vDisk's settings to check a change against: ours, else a holder's."""
        versions = self.server.catalog.versions(name)
        if versions:
            return versions[max(versions)].properties
        site = self.server.site
        holders = sorted(
            (p for p in (site.peers.values() if site is not None else ()) if _holds(p, name)),
            key=lambda p: p.name,
        )
        if not holders:
            raise ApiError(
                404, f"no server of the site holds a vDisk named {name!r}; see pvsctl vdisks",
            )
        entry = max(
            (e for e in holders[0].inventory.values() if e.vdisk == name),
            key=lambda e: e.version,
        )
        try:
            return VDiskProperties(
                mode=Mode.from_code(entry.mode), maintenance=entry.maintenance,
                load_balancing=entry.load_balancing, fixed_server=entry.fixed_server,
                subnet_affinity=SubnetAffinity.from_code(entry.affinity),
            )
        except (PropertiesError, ValueError):
            return VDiskProperties()

    def _server_names(self) -> set[str]:
        site = self.server.site
        return {self.config.name} | (set(site.peers) if site is not None else set())

    # -- talking to peers -------------------------------------------------------------------

    async def _fan_out(
        self, method: str, path: str, body: bytes | None, timeout: float
    ) -> list[tuple[str, str, JSON | PeerError]]:
        """Ask every up peer at once; each answer is its JSON or the error it came to."""
        site = self.server.site
        peers = sorted(
            (p for p in (site.peers.values() if site is not None else ()) if p.up),
            key=lambda p: p.name,
        )

        async def ask(peer: Peer) -> JSON | PeerError:
            try:
                return await self._peer_request(peer, method, path, body or b"", timeout)
            except PeerError as error:
                log.warning("admin_peer_failed", peer=peer.name, path=path, error=str(error))
                return error

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(ask(peer)) for peer in peers]
        return [
            (peer.name, peer.admin_address or "", task.result())
            for peer, task in zip(peers, tasks, strict=True)
        ]

    async def _peer_request(
        self, peer: Peer, method: str, path: str, body: bytes, timeout: float
    ) -> JSON:
        address = peer.admin_address
        if not address:
            raise PeerError(f"{peer.name} announces no admin API: start its pvsd with --admin")
        return await self._request(peer.name, address, method, path, body, timeout)

    async def _request(
        self, server: str, address: str, method: str, path: str, body: bytes, timeout: float
    ) -> JSON:
        if self._client is None:
            raise PeerError("admin API is closing")
        peers = self._peers
        try:
            target = peers.target(address)
        except ValueError as error:
            raise PeerError(f"{server}: admin address {error}") from None
        headers = {
            "Authorization": admin_auth.sign(
                self.config.site_key, method, path, body, _now_ms(), target=target
            ),
            "Content-Type": "application/json",
        }
        try:
            async with asyncio.timeout(timeout):
                async with self._client.request(
                    method, peers.url(address, path), data=body or None, headers=headers,
                    **peers.options(server),
                ) as response:
                    text = await response.text()
                    status = response.status
        except TimeoutError:
            raise PeerError(
                f"{server} ({address}) did not answer within {timeout:g} s"
            ) from None
        except aiohttp.ClientConnectorCertificateError as error:
            raise PeerError(
                f"{server} ({address}) showed a certificate the site CA does not vouch for as "
                f"{server!r} ({error.certificate_error}); give it one made by pvsctl site certs "
                "with this CA"
            ) from None
        except aiohttp.ClientSSLError as error:
            raise PeerError(
                f"{server} ({address}): TLS failed ({error}); every server of a site must use "
                "TLS for its admin API, or none"
            ) from None
        except aiohttp.ClientError as error:
            raise PeerError(f"{server} ({address}): {error or type(error).__name__}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise PeerError(f"{server} ({address}) answered HTTP {status} without JSON")
        if status >= 400:
            raise PeerError(f"{server}: {answer.get('error')}", status)
        return answer


# -- pure helpers ---------------------------------------------------------------------------


def damage_json(vdisk: VDisk) -> JSON | None:
    """What found the damage and when, beside where (the site's entry has where too)."""
    damage = vdisk.damage
    if damage is None:
        return None
    return {
        "first_offset": damage.first_offset, "bad_blocks": damage.bad_blocks,
        "complete": damage.complete, "found_by": damage.found_by, "since": _iso(damage.since),
    }


def scrub_json(vdisk: VDisk) -> JSON:
    """The pass over the copy running now (scrub, verify, recheck or making the manifest)
    and when the last scrub finished."""
    progress = vdisk.progress
    return {
        "running": progress is not None,
        "activity": vdisk.activity if progress is not None else "",
        "done": progress.done if progress is not None else None,
        "total": progress.total if progress is not None else None,
        "percent": progress.percent if progress is not None else None,
        "mb_per_s": progress.mb_per_s if progress is not None else None,
        "last_finished": _iso(vdisk.last_scrub) if vdisk.last_scrub else None,
    }


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def parse_changes(body: bytes) -> JSON:
    """The settings a request wants changed; their values are checked against the file."""
    data = parse_json(body, example='an object such as {"maintenance": true}')
    if not isinstance(data, dict) or not data:
        raise ApiError(
            400, "body must be a JSON object with at least one setting, e.g. {\"version\": 2}"
        )
    if FORCE in data and not isinstance(data[FORCE], bool):
        raise ApiError(400, f"{FORCE} must be true or false")
    unknown = sorted(set(data) - set(SETTABLE) - {MANIFEST_TIME, FORCE})
    if unknown:
        raise ApiError(
            400, f"unknown setting(s) {', '.join(unknown)}; settable: {', '.join(SETTABLE)}"
        )
    created_ns = data.get(MANIFEST_TIME)
    if MANIFEST_TIME in data and (
        "version" not in data or not isinstance(created_ns, int) or isinstance(created_ns, bool)
        or created_ns < 0
    ):
        raise ApiError(
            400, f"{MANIFEST_TIME} goes only with a version, as nanoseconds since the epoch"
        )
    return data


def _properties_part(changes: JSON) -> JSON:
    return {key: value for key, value in changes.items() if key not in (MANIFEST_TIME, FORCE)}


def cuts_off(current: VDiskProperties, changes: JSON) -> list[str]:
    """The changes that would take a vDisk away from targets streaming it now: a new version
    number (they pinned the old one), another mode (the copy is checked again), maintenance
    (only maintenance devices may log in again) or a narrower choice of servers (they could
    not fail over)."""
    cuts = []
    if "version" in changes and changes["version"] != current.version:
        cuts.append("the version")
    if "mode" in changes and changes["mode"] != str(current.mode):
        cuts.append("the mode")
    if changes.get("maintenance") is True and not current.maintenance:
        cuts.append("maintenance")
    if changes.get("load_balancing") is False and current.load_balancing:
        cuts.append("load balancing")
    if changes.get("subnet_affinity") == "fixed" and current.subnet_affinity != "fixed":
        cuts.append("the subnet affinity")
    return cuts


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _holds(peer: Peer, name: str) -> bool:
    """Whether the peer said it holds any version of vDisk ``name``."""
    return any(vdisk == name for vdisk, _version in peer.inventory)


def _peer_state(peer: Peer) -> str:
    if not peer.up:
        return "down"
    return peer.heartbeat.state.name.lower()


def _silent_for(peer: Peer) -> float:
    return max(time.monotonic() - peer.last_heard, 0.0)


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _version() -> str:
    try:
        return importlib.metadata.version("pvs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _http_error_message(request: web.Request, error: web.HTTPException) -> str:
    if error.status == 404:
        return f"no endpoint {request.path}; the API is under /v1 (servers, vdisks, targets, site)"
    if error.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if error.status == 413:
        return f"request body larger than {MAX_BODY} bytes"
    return error.reason or f"HTTP {error.status}"

