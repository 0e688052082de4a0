"""Starting one of pvsd's HTTP listeners (the admin API, network boot): one way to fail.

aiohttp's runner must be cleaned up whatever stops its site from starting, and a port that
cannot be taken is told as one line naming the listener, the reason and the option to change.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from pvs_protocol.addresses import format_address


async def start(
    runner: web.AppRunner, site: Callable[[web.AppRunner], web.BaseSite], what: str, option: str
) -> str:
    """Set ``runner`` up and start the site ``site`` makes of it; the ``HOST:PORT`` it is bound
    to. An OSError says ``cannot listen for WHAT: REASON; free the port or choose another
    with OPTION``."""
    await runner.setup()
    try:
        await site(runner).start()
    except OSError as error:
        await runner.cleanup()
        raise OSError(
            error.errno, f"cannot listen for {what}: {error.strerror}; free the port or choose "
            f"another with {option}",
        ) from None
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return format_address(str(host), int(port))
