"""The network boot listener: kernels, initramfs and iPXE scripts over plain HTTP.

PXE firmware and iPXE speak plain, unauthenticated HTTP, so this is a listener of its own
(``boot_listen``), apart from the admin API (which may speak TLS only and sits behind a
firewall): it serves boot files and scripts, nothing else, and changes nothing.

    GET /boot/NAME.ipxe                   a script that asks again with the machine's MAC
    GET /boot/NAME.ipxe?device=ID         the script booting the version that device gets
    GET /boot/NAME/VERSION/vmlinuz        the kernel of a version this server holds
    GET /boot/NAME/VERSION/initrd         its initramfs

HEAD too. The version a device boots is chosen as its login would be (`balance.choose` over
this server's view of the site, the device's class from the vDisk's properties, as
`StreamServer.place` does), and pinned on the kernel command line (``pvs.identity``), so that
the root the initramfs streams is the version whose kernel booted. Files are sent with
aiohttp's FileResponse (sendfile, Range, If-Modified-Since). A refusal is one line of text
with a 4xx or 5xx status; every request is logged once, when answered (`_AccessLog`), and
counted for ``pvsd_boot_requests`` (`pvsd.metrics`).

The listener is bounded (`pvsd.boot_guard`, `pvsd.boot_limits`): connections in all and per
address, and a deadline for each request to arrive whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import cast

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_request import BaseRequest

from pvs_protocol.errors import ErrorCode
from pvsd import balance, listening
from pvsd import boot as bt
from pvsd.boot_guard import REQUEST_LIMITS, ConnectionGuard, GuardedSite, keepalive_timeout
from pvsd.config import Config, format_address
from pvsd.metrics import BootStats, boot_requests_of
from pvsd.names import InvalidName, validate_device_id, validate_name
from pvsd.server import StreamServer
from pvsd.store import VDisk
from pvsd.version_files import find_boot_files

log = structlog.get_logger("pvsd.boot")

SHUTDOWN_TIMEOUT = 2.0
"""On stop, how long a kernel or initramfs being sent may take to finish."""


@dataclasses.dataclass(slots=True)
class Note:
    """What a request was about, filled in by its handler, logged and counted once answered."""

    file: str = "other"
    vdisk: str | None = None
    version: int | None = None
    device: str | None = None
    error: str | None = None


_NOTE = web.RequestKey("pvs_boot_note", Note)
_AIOHTTP_LOG = logging.getLogger("pvsd.boot.aiohttp")
"""aiohttp's own log lines for this listener (`_AiohttpLines`)."""


class Refused(Exception):
    """A request answered with an error status and one line saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BootServer:
    """The listener and its handlers; `start` listens, `close` stops (pvsd's main task
    owns both calls, as it does the admin API's)."""

    def __init__(self, config: Config, server: StreamServer) -> None:
        self.config = config
        self.server = server
        self.address = config.boot_listen
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; only once this returns is network boot served."""
        config = self.config
        guard = ConnectionGuard(
            config.boot_max_connections, config.max_connections_per_source,
            config.boot_request_timeout,
        )
        app = web.Application(middlewares=[_refusals(guard)], client_max_size=1024)
        app.add_routes([
            web.get("/boot/{vdisk}.ipxe", self._script),
            web.get("/boot/{vdisk}/{version}/{file}", self._file),
        ])
        if not _AIOHTTP_LOG.handlers:
            _AIOHTTP_LOG.addHandler(_AiohttpLines())
            _AIOHTTP_LOG.propagate = False
        runner = web.AppRunner(
            app, access_log_class=_AccessLog.of(boot_requests_of(self.server), guard),
            handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT, logger=_AIOHTTP_LOG,
            keepalive_timeout=keepalive_timeout(config.boot_request_timeout), **REQUEST_LIMITS,
        )
        self.address = await listening.start(
            runner, lambda ready: GuardedSite(ready, guard, config.boot_host, config.boot_port),
            f"network boot on {config.boot_listen}", "--boot-listen HOST:PORT",
        )
        self._runner = runner
        log.info("boot_listening", address=self.address,
                 script=f"http://{self.address}/boot/NAME.ipxe",
                 max_connections=config.boot_max_connections,
                 per_source=config.max_connections_per_source,
                 request_timeout=config.boot_request_timeout)

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- scripts ----------------------------------------------------------------------------

    async def _script(self, request: web.Request) -> web.Response:
        note = request[_NOTE]
        note.file = "chain"
        name = note.vdisk = _vdisk(request.match_info["vdisk"])
        host = self._host(request)
        device = request.query.get("device")
        if device is None:
            return _text(bt.chain_script(host, name))
        note.file = "script"
        try:
            note.device = validate_device_id(device)
        except InvalidName as error:
            raise Refused(400, str(error)) from None
        return _text(await self._boot_script(note, host, request.remote))

    async def _boot_script(self, note: Note, host: str, client: str | None) -> str:
        assert note.vdisk is not None and note.device is not None
        name, device, server, me = note.vdisk, note.device, self.server, self.config.name
        view = server.view()
        placement = balance.choose(
            view, name, me=me, target_ip=client, device=server.device_class(name, device)
        )
        if isinstance(placement, balance.Refusal):
            status = 404 if placement.code is ErrorCode.UNKNOWN_VDISK else 503
            raise Refused(status, placement.message)
        identity = placement.identity
        number = note.version = identity.version
        holders = [(s.name, s.address) for s in view if s.serving and s.holds(name, identity)]
        copy = server.catalog.holding(name, identity)
        if copy is None or copy.damage is not None:
            others = ", ".join(n for n, _a in holders) or "none now"
            raise Refused(503, f"{me} holds no good copy of {name} version {number} "
                          f"({identity.short}), the one {device} gets: boot it from a server "
                          f"that does ({others}), or copy it here: pvsctl vdisk replicate "
                          f"{name} --version {number} --to {me}")
        self._refuse_stalled(copy)
        files = await asyncio.to_thread(_boot_files, copy)
        for kind in bt.SERVED:
            problem = files.get(kind)
            if isinstance(problem, str):
                raise Refused(404, problem)
        extra = ""
        cmdline = files.get(bt.BootFile.cmdline)
        try:
            if isinstance(cmdline, Path):
                text = await asyncio.to_thread(_read_cmdline, cmdline)
                extra = bt.extra_arguments(text, str(cmdline))
            elif isinstance(cmdline, str):
                raise bt.BootError(cmdline)
            servers = [
                (n, bt.own_address(a, host) if n == me else a) for n, a in holders
            ]
            return bt.BootScript(
                host, name, number, bt.placement_order(servers, me), identity.token(), device,
                extra,
            ).render()
        except bt.BootError as error:
            raise Refused(500, f"cannot boot {name} version {number} from {me}: {error}") from None

    # -- files ------------------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.FileResponse:
        note = request[_NOTE]
        name = note.vdisk = _vdisk(request.match_info["vdisk"])
        text = request.match_info["file"]
        if text not in bt.SERVED:
            raise Refused(404, f"no boot file {text[:40]!r}: ask for vmlinuz or initrd")
        kind = bt.BootFile(text)
        note.file = str(kind)
        number = note.version = _version(request.match_info["version"])
        copy = self.server.catalog.replica(name, number)
        me = self.config.name
        if copy is None:
            raise Refused(404, f"{me} holds no version {number} of {name}")
        if copy.damage is not None:
            raise Refused(503, f"{me}'s copy of {name} version {number} is damaged: boot from "
                          "another server (see pvsctl vdisks)")
        self._refuse_stalled(copy)
        found = (await asyncio.to_thread(_boot_files, copy)).get(kind)
        if not isinstance(found, Path):
            raise Refused(404, found or f"{name} version {number} has no {kind.what}")
        return web.FileResponse(found, headers={"Cache-Control": "no-cache"})

    # -- helpers ----------------------------------------------------------------------------

    def _host(self, request: web.Request) -> str:
        """Where the machine reached us (written into the script's URLs)."""
        fallback = self.address
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            fallback = format_address(str(sockname[0]), int(sockname[1]))
        return bt.request_host(request.headers.get("Host"), fallback)

    def _refuse_stalled(self, copy: VDisk) -> None:
        if self.server.store_stalled(copy.store.path):
            raise Refused(503, f"the store of {copy.name} on {self.config.name} is not "
                          "answering (stalled I/O): boot from another server")


# -- requests and answers ---------------------------------------------------------------------


def _vdisk(text: str) -> str:
    try:
        return validate_name(text)
    except InvalidName as error:
        raise Refused(400, str(error)) from None


def _version(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise Refused(400, f"version {text[:40]!r} is not a version number")
    return int(text)


def _text(body: str) -> web.Response:
    return web.Response(
        text=body, content_type="text/plain", headers={"Cache-Control": "no-store"}
    )


def _refusals(guard: ConnectionGuard) -> Middleware:
    """Every request gets its `Note`; every refusal becomes one line of text. The guard hears
    that the request is whole: no deadline while it is answered."""

    @web.middleware
    async def refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard.request(request.transport)
        note = request[_NOTE] = Note()
        headers: dict[str, str] = {}
        try:
            return await handler(request)
        except Refused as refusal:
            status, message = refusal.status, refusal.message
        except web.HTTPException as error:
            if error.status < 400:
                raise
            status = error.status
            if status == 404:
                message = (f"nothing is served at {request.path[:100]!r}: ask for "
                           "/boot/NAME.ipxe or /boot/NAME/VERSION/vmlinuz or initrd")
            elif status == 405:
                message = f"{request.method[:16]} is not served here: GET or HEAD only"
                headers["Allow"] = "GET, HEAD"
            else:
                message = error.reason or f"HTTP {status}"
        except Exception:
            log.exception("boot_internal_error", path=request.path[:200], client=request.remote)
            status, message = 500, "internal error in pvsd: its log has the details"
        note.error = message
        return web.Response(status=status, text=message + "\n", content_type="text/plain",
                            headers=headers)

    return refusals


class _AccessLog(AbstractAccessLogger):
    """One line per request once it is answered (the bytes of a file sent by sendfile are
    known only then): info for what was served, warning for a refusal. The guard hears that
    the answer is sent: the connection's next request has a deadline.

    aiohttp makes it (from the class), so each listener has a subclass holding its own."""

    stats: BootStats
    guard: ConnectionGuard

    @classmethod
    def of(cls, stats: BootStats, guard: ConnectionGuard) -> type[_AccessLog]:
        return cast(type[_AccessLog], type("_BootAccessLog", (cls,), {"stats": stats,
                                                                     "guard": guard}))

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.guard.answered(request.transport)
        note = request.get(_NOTE)
        if note is None:  # aiohttp refused it before the application saw it (unparsable)
            text = response.text if isinstance(response, web.Response) else None
            note = Note(error=(text or "").strip().split("\n")[0][:200] or "not a request "
                        "pvsd can read")
        self.stats.answered(note.file, response.status)
        sent = 0 if request.method == "HEAD" or response.status == 304 else (
            response.content_length or 0
        )
        fields = {
            "file": note.file, "vdisk": note.vdisk, "version": note.version,
            "device": note.device, "client": request.remote, "method": request.method[:16],
            "status": response.status, "bytes": sent, "seconds": round(time, 4),
        }
        if note.error is not None:
            log.warning("boot_request_refused", error=note.error, **fields)
        else:
            log.info("boot_request", **fields)


class _AiohttpLines(logging.Handler):
    """aiohttp's own log lines for the listener, as ours: a request it could not parse (at
    ERROR, with a traceback) is refused and logged by `_AccessLog` already, so it is a debug
    line; anything else is one line at its level, the error's first line without the
    traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        fields = {"message": record.getMessage()[:200]}
        if error is not None:
            first = (str(error).strip().splitlines() or [""])[0]
            fields["error"] = f"{type(error).__name__}: {first[:200]}"
        if isinstance(error, HttpProcessingError):
            log.debug("boot_request_unparsed", **fields)
        elif record.levelno >= logging.ERROR:
            log.error("boot_http_error", **fields)
        elif record.levelno >= logging.WARNING:
            log.warning("boot_http_warning", **fields)
        else:
            log.debug("boot_http_debug", **fields)


# -- the store (worker threads) ---------------------------------------------------------------


def _boot_files(copy: VDisk) -> dict[bt.BootFile, Path | str]:
    """Each boot file of ``copy``'s version: its path when it can be served, else what is
    wrong (missing: which file to put where). Blocking."""
    found: dict[bt.BootFile, Path | str] = {}
    for kind, state in find_boot_files(copy.path, copy.store.path).items():
        if state.real is not None:
            found[kind] = state.real
        elif state.problem:
            found[kind] = state.problem
        elif kind is not bt.BootFile.cmdline:
            found[kind] = (f"{copy.name} version {copy.version} has no {kind.what}: put it at "
                           f"{state.path}")
    return found


def _read_cmdline(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(bt.MAX_CMDLINE_FILE + 1)
    except OSError as error:
        raise bt.BootError(f"cannot read {path}: {error.strerror}") from None
    if len(data) > bt.MAX_CMDLINE_FILE:
        raise bt.BootError(f"{path} is larger than {bt.MAX_CMDLINE_FILE} bytes: one line of "
                           "kernel arguments is expected")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise bt.BootError(f"{path} is not ASCII text: write the kernel arguments in "
                           "ASCII") from None
