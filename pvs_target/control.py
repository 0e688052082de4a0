"""The attached target's control socket: ``pvs-target status`` asks it how the stream goes.

One JSON request line in, one JSON answer line out, over a unix socket that only root (or the
owner) can reach: status carries nothing secret, but a control channel should not be open to
every local user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("pvs_target.control")

DEFAULT_PATH = "/run/pvs-target/control.sock"
MAX_REQUEST = 4096


class ControlServer:
    def __init__(self, path: str, status: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.status = status
        self._parts: list[Callable[[], dict[str, Any]]] = []
        self._server: asyncio.Server | None = None

    def add(self, part: Callable[[], dict[str, Any]]) -> None:
        """More of the status, from a part started after the stream (the NBD export: its
        clients and its write cache), merged into what ``status`` says."""
        self._parts.append(part)

    async def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a process that is gone
        old_umask = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path)
        finally:
            os.umask(old_umask)
        log.info("control_listening", path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                line = await reader.readline()
            if len(line) > MAX_REQUEST:
                answer: dict[str, Any] = {"error": "request too long"}
            else:
                answer = self._answer(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError) as error:
            log.warning("control_client_failed", error=str(error) or type(error).__name__)
        finally:
            writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line or b"{}")
        except ValueError:
            return {"error": "request is not JSON: send {\"command\": \"status\"}"}
        command = request.get("command", "status") if isinstance(request, dict) else None
        if command != "status":
            return {"error": f"unknown command {command!r}; known: status"}
        status = self.status()
        for part in self._parts:
            status.update(part())
        return {"status": status}


async def query(path: str, command: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Ask an attached target; raise OSError with a clear message when nobody answers."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(json.dumps({"command": command}).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
    except (FileNotFoundError, ConnectionRefusedError):
        raise OSError(
            f"no attached target at {path}: is 'pvs-target attach --control {path}' running?"
        ) from None
    except TimeoutError:
        raise OSError(f"the target at {path} did not answer within {timeout:g} s") from None
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise OSError(f"unexpected answer from {path}")
    if "error" in answer:
        raise OSError(f"{path}: {answer['error']}")
    status = answer.get("status")
    assert isinstance(status, dict)
    return status
