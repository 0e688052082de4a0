"""The target's client library for one server connection: the public names, and ``read_range``.

    session = await login(["10.0.0.1:6910"], "win10", "lab-pc-07")
    try:
        data = await session.connection.read(0, 4096)
    finally:
        await session.close()

``connection.py`` holds the connection itself, ``login.py`` the login with redirect following.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pvs_target.connection import (
    ClientError,
    ConnectFailed,
    ConnectionLost,
    ServerError,
    StreamConnection,
    open_connection,
)
from pvs_target.login import LoginError, Session, login

Sink = Callable[[int, bytes | bytearray], Awaitable[None] | None]
"""Receives ``(offset, data)`` in offset order; may be a coroutine function (backpressure)."""
Reader = Callable[[int, int], Coroutine[Any, Any, bytes | bytearray]]
"""Reads ``(offset, length)``: the connection's own ``read``, or one that checks what it reads
(``ReadVerifier.read``)."""


async def read_range(
    session: Session | StreamConnection,
    offset: int,
    length: int,
    *,
    chunk: int | None = None,
    depth: int = 32,
    sink: Sink | None = None,
    read: Reader | None = None,
) -> bytes | None:
    """Read ``length`` bytes from ``offset`` with up to ``depth`` requests in flight.

    Chunks reach ``sink`` in order (a slow sink holds back at most ``depth`` chunks); without a
    sink the range is returned as one ``bytes``. The first failure is raised as it is (a
    ``ClientError``) after the other requests are cancelled. ``read`` replaces the
    connection's own read (to verify each chunk; then align ``chunk`` and ``offset`` to its
    blocks, so that no chunk needs more than one request).
    """
    connection = session.connection if isinstance(session, Session) else session
    size = min(chunk or connection.max_request, connection.max_request)
    if size < 1 or depth < 1:
        raise ValueError("chunk and depth must be positive")
    if offset < 0 or length < 0:
        raise ValueError("offset and length must not be negative")
    reader = read or connection.read
    parts: list[bytes | bytearray] = []
    deliver = sink or (lambda _at, data: parts.append(data))
    end = offset + length
    next_offset = offset
    queue: deque[tuple[int, asyncio.Task[bytes | bytearray]]] = deque()
    try:
        while queue or next_offset < end:
            while next_offset < end and len(queue) < depth:
                count = min(size, end - next_offset)
                task = asyncio.create_task(reader(next_offset, count))
                queue.append((next_offset, task))
                next_offset += count
            at, task = queue.popleft()
            delivered = deliver(at, await task)
            if inspect.isawaitable(delivered):
                await delivered
    finally:
        for _, task in queue:
            task.cancel()
        if queue:
            await asyncio.gather(*(task for _, task in queue), return_exceptions=True)
    return None if sink else b"".join(parts)


__all__ = [
    "ClientError",
    "ConnectFailed",
    "ConnectionLost",
    "LoginError",
    "Reader",
    "ServerError",
    "Session",
    "Sink",
    "StreamConnection",
    "login",
    "open_connection",
    "read_range",
]
