"""pvsd entry point: argv -> config -> run until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from pvsd import config as config_module
from pvsd import locks, sd_notify
from pvsd.admin import AdminServer
from pvsd.boot_http import BootServer
from pvsd.logs import configure
from pvsd.rebalancing import Rebalancer
from pvsd.replicator import Replicator
from pvsd.server import StreamServer
from pvsd.site import Site
from pvsd.store import Catalog, Store

log = structlog.get_logger("pvsd")


async def serve(config: config_module.Config) -> int:
    """Run the server; the exit code: 0, or 2 if another server of the site has our name."""
    stores = [Store(path) for path in config.stores]
    stores += [Store(path, shared=True) for path in config.shared_stores]
    for store in stores:  # before any login: no session of this process holds them
        locks.release_stale(store.path, config.name)
    # Hashing, verification and scrub get a pool of their own: serving never waits for it.
    background = ThreadPoolExecutor(config.background_threads, thread_name_prefix="pvsd-bg")
    catalog = Catalog(stores, threads=config.background_threads, executor=background)
    server = StreamServer(config, catalog)
    try:
        code = await _serve(config, catalog, server)
    finally:
        server.close()
        background.shutdown(wait=False, cancel_futures=True)
        catalog.close()
    log.info("stopped")
    return code


async def _serve(config: config_module.Config, catalog: Catalog, server: StreamServer) -> int:
    """Serve until SIGTERM/SIGINT, or until another server turns out to have our name
    (then stop the same orderly way and return 2)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with asyncio.TaskGroup() as group:
        background = [group.create_task(catalog.watch(config.watch_interval))]
        await server.start()
        if config.site_key:
            site = Site(config, server.local_state, server.advertised)
            server.site = site
            site.on_peer_down.append(server.peer_down)
            site.on_name_conflict.append(lambda _other: stop.set())
            catalog.on_change(lambda _name, _vdisk: site.inventory_changed())
            background.append(group.create_task(site.run()))
            background.append(group.create_task(server.send_site_updates()))
        admin = AdminServer(config, server)
        if config.site_key:  # copies from other servers come over their admin API
            admin.replication.replicator = replicator = Replicator(config, server)
            background.append(group.create_task(replicator.run(), name="replicator"))
        if server.site is not None:  # moves targets from busy servers (pvsd.rebalancing)
            admin.rebalance.rebalancer = rebalancer = Rebalancer(config, server)
            server.site.on_peer_up.append(rebalancer.peer_up)
            background.append(group.create_task(rebalancer.run(), name="rebalancer"))
        if config.admin_host:
            await admin.start()
        boot = BootServer(config, server)  # kernels and iPXE scripts (pvsd.boot_http)
        if config.boot_host:
            await boot.start()
        notifier = sd_notify.Notifier.from_environment()  # readiness, watchdog (Type=notify)
        status = sd_notify.PvsdStatus(server, loop.time())
        background.append(group.create_task(sd_notify.supervise(notifier, status)))
        await stop.wait()
        log.info("shutdown_requested")
        sd_notify.stopping(notifier, "stopping: moving targets to other servers")
        await server.stop()
        await boot.close()
        await admin.close()
        for task in background:
            task.cancel()
    return 2 if server.site is not None and server.site.conflict is not None else 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_module.load(argv)
    except config_module.ConfigError as error:
        print(f"pvsd: {error}", file=sys.stderr)
        return 2
    configure(json=config.log_json, level=config.log_level, name=config.name)
    failed, code = False, 0
    try:
        code = _run(serve(config))
    except* OSError as group:  # raised inside the TaskGroup, so it comes as a group
        failed = True
        for failure in group.exceptions:
            log.error(
                "cannot_start", error=str(failure),
                hint="the message names what failed: an address in use or not local, or a "
                "file that cannot be read",
            )
    return 1 if failed else code


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    else:
        return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
