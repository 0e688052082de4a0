"""Running the target's event loop: uvloop when it is installed, else asyncio.

uvloop roughly doubles what one Python connection can carry (docs: ANCHORS.md), so it is the
default; the fallback keeps the target usable where uvloop is not built (e.g. Windows).
"""

from __future__ import annotations

import asyncio
import gc
import importlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
GC_THRESHOLD = 50_000


def uvloop_available() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def tune_gc() -> None:
    """Collect young objects less often, and never look at what exists at start again.

    Every request makes a few short-lived objects (a future, a callback, buffers' views):
    with CPython's default threshold (700) the collector ran every few hundred requests and
    took ~5% of the target's time under load. What outlives the start-up (modules, classes,
    configuration) is moved out of the collector's sight with ``gc.freeze``.
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``main`` to completion on a new loop and close it, like ``asyncio.run``."""
    tune_gc()
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
