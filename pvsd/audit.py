"""The audit trail of the admin API: one ``admin_audit`` log line per request that changes
something, refused ones included, saying who, what, and before and after.

- **who**: the client's address; the key id (the first 8 hex digits of SHA-256 of the site
  key: which key signed, without giving it away; it changes when the key does); and the
  subject of the client certificate when the client showed one over TLS (pvsctl ``--cert``,
  or a peer forwarding a change: each server shows its certificate to the others).
- **what**: method, path and body.
- **before and after**: for vDisk settings, the properties of each server before and after
  (``before``, ``after``); for every other change the answer (``result``), which says what
  was done on each server.

Written by the admin API's middleware for every authenticated POST (so no endpoint can be
forgotten); a handler that knows more (the settings before a change) adds it with `note`.
A forwarded part of a change (``/v1/local/...``) is audited by the server that carries it
out, naming the forwarding server as who.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import structlog
from aiohttp import web

from pvsd import tls

log = structlog.get_logger("pvsd.audit")

JSON = dict[str, Any]
EVENT = "admin_audit"
MAX_TEXT = 4096
"""A body or answer longer than this (as JSON) is logged cut, with its length."""
_NOTES = "pvs_audit"


def who(request: web.Request, key_id: str) -> JSON:
    return {
        "address": request.remote,
        "key_id": key_id,
        "certificate": tls.peer_subject(request.transport),
    }


def note(request: web.Request, **fields: Any) -> None:
    """What a handler adds to the audit line of its request (``before``, ``after``)."""
    notes: JSON = request.setdefault(_NOTES, {})
    notes.update(fields)


def settings_before_after(results: Iterable[JSON]) -> JSON:
    """``before`` and ``after`` per server from the results of a settings change (each
    server's ``properties_before`` and ``properties``)."""
    before, after = {}, {}
    for result in results:
        server = str(result.get("server"))
        if isinstance(result.get("properties_before"), dict):
            before[server] = result["properties_before"]
        if isinstance(result.get("properties"), dict):
            after[server] = result["properties"]
    return {"before": before, "after": after}


def record(
    request: web.Request,
    key_id: str,
    body: bytes,
    status: int,
    answer: object = None,
    error: str | None = None,
) -> None:
    """The audit line of one request that was (or was not: ``status`` >= 400) a change."""
    notes: JSON = request.get(_NOTES, {})
    fields: JSON = {
        "who": who(request, key_id),
        "method": request.method,
        "path": request.path_qs,
        "body": _shown(_body(body)),
        "status": status,
        "outcome": "done" if status < 400 else "refused" if status < 500 else "failed",
    }
    if "before" in notes or "after" in notes:
        fields["before"] = _shown(notes.get("before"))
        fields["after"] = _shown(notes.get("after"))
        fields["result"] = _shown(_without_properties(answer))
    elif answer is not None:
        fields["result"] = _shown(answer)
    if error is not None:
        fields["error"] = error
    log.info(EVENT, **fields)


def answer_of(response: web.StreamResponse) -> object:
    """The JSON a handler answered with, if it did."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    body = response.body
    if not isinstance(body, bytes | bytearray):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _body(raw: bytes) -> object:
    if not raw:
        return None
    try:
        value = json.loads(raw)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # no lone surrogate to log
    except (ValueError, RecursionError, UnicodeEncodeError):
        return raw[:MAX_TEXT].decode("utf-8", "backslashreplace")
    return value


def _without_properties(answer: object) -> object:
    """A settings answer without the properties (the audit line has them as before/after)."""
    if not isinstance(answer, dict):
        return answer
    shown = dict(answer)
    results = shown.get("results")
    if isinstance(results, list):
        shown["results"] = [
            {k: v for k, v in r.items() if k not in ("properties", "properties_before")}
            if isinstance(r, dict) else r
            for r in results
        ]
    shown.pop("properties", None)
    shown.pop("properties_before", None)
    return shown


def _shown(value: object) -> object:
    """``value`` itself when short; else its start as text, and its length."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= MAX_TEXT:
        return value
    return {"cut": text[:MAX_TEXT], "length": len(text)}
