"""What every part of the admin API shares: the refusal, and the one check of a vDisk name
in a path."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pvsd.names import InvalidName, validate_name

JSON = dict[str, Any]


class ApiError(Exception):
    """A request we refuse; ``message`` tells the client what to do instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def vdisk_name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return validate_name(name)
    except InvalidName as error:
        raise ApiError(400, str(error)) from None
