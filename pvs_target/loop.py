"""Running the target's event loop: uvloop when it is installed, else asyncio.

uvloop roughly doubles what one Python connection can carry (docs: ANCHORS.md), so it is the
default; the fallback keeps the target usable where uvloop is not built (e.g. Windows).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def uvloop_available() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on a new loop and close it, like ``asyncio.run``."""
    if use_uvloop and uvloop_available():
        import uvloop

        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)


def loop_name() -> str:
    """Which loop runs the current task, for reports and benchmarks."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


__all__ = ["loop_name", "run", "uvloop_available"]
