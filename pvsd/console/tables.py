"""The admin API's answers as tables an administrator reads at a glance.

Each function takes the JSON the API returned and builds a rich `Table`; nothing here talks to
the network, so the layout can be tested with canned answers.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

_STATE_STYLE = {"serving": "green", "stopping": "yellow", "stopped": "yellow", "down": "red"}
_STATUS_STYLE = {
    "identical": "green", "different": "red", "damaged": "bold red", "pending": "yellow",
}


def servers_table(servers: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(
        "Server", "State", "Stream address", "Admin address", "Power", "Targets", "Load",
        "Throughput", "Last heard", "vDisks",
        caption="* the server that answered", caption_justify="left",
    )
    for server in servers:
        heard = server.get("heard", True)
        name = server.get("name") or "(never heard)"
        state = str(server.get("state"))
        table.add_row(
            f"{name} *" if server.get("self") else name,
            Text(state, style=_STATE_STYLE.get(state, "")),
            str(server.get("stream_address", "")),
            str(server.get("admin_address") or "-"),
            _number(server.get("power")),
            _number(server.get("targets")),
            _number(server.get("load")),
            f"{human_size(int(server['bytes_per_second']))}/s" if heard else "-",
            _ago(server.get("last_heard_seconds"), server.get("self", False)),
            _number(server.get("vdisks")),
        )
    return table


def vdisks_table(vdisks: Sequence[Mapping[str, Any]]) -> Table:
    """One replication screen: per vDisk a row per server holding it."""
    table = Table(
        "vDisk", "Server", "Identity", "Status", "Scrub", "Settings", "Failover",
        caption="status is against the copy new targets get (pvsctl vdisk versions: what each "
        "version is); 'version N (state)' is a good copy of another version; a damaged copy is "
        "never served: copy the image and its manifest from a server showing identical over it",
        caption_justify="left",
    )
    for index, vdisk in enumerate(vdisks):
        if index:
            table.add_section()
        candidates = set(vdisk.get("failover_candidates", ()))
        for row, replica in enumerate(vdisk.get("replicas", ())):
            server = str(replica["server"])
            if replica.get("server_state") not in (None, "serving"):
                server += f" ({replica['server_state']})"
            table.add_row(
                str(vdisk["name"]) if row == 0 else "",
                server,
                str(replica.get("short", "")),
                _status(replica),
                scrub_text(replica.get("scrub")),
                _settings_text(replica.get("settings", {}), replica.get("settings_differ", [])),
                _failover(vdisk, replica, candidates),
            )
    return table


def targets_table(targets: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(
        "Device", "vDisk", "Server", "Server address", "Target address", "Since", "Connected",
        "Read",
    )
    for target in targets:
        table.add_row(
            str(target.get("device_id", "")),
            str(target.get("vdisk", "")),
            str(target.get("server", "")),
            str(target.get("server_address", "")),
            str(target.get("address", "")),
            _local_time(str(target.get("since", ""))),
            duration(float(target.get("seconds", 0))),
            human_size(int(target.get("bytes_read", 0))),
        )
    return table


def site_table(site: Mapping[str, Any]) -> Table:
    table = Table("", "", show_header=False, box=None)
    coordination = site.get("coordination", {})
    admin = site.get("admin", {})
    dropped = coordination.get("dropped") or {}
    failures = admin.get("auth_failures_by_reason") or {}
    rows = [
        ("Server", f"{site.get('name')} (pvs {site.get('version')}), {site.get('state')}"),
        ("Stream address", str(site.get("stream_address"))),
        ("Admin address", str(site.get("admin_address"))),
        ("Peers up", f"{coordination.get('peers_up', 0)} of {coordination.get('peers', 0)}"),
        ("Coordination received", str(coordination.get("received", 0))),
        ("Coordination dropped", _counts(dropped)),
        ("Admin requests", str(admin.get("requests", 0))),
        ("Admin refused (auth)", _counts(failures)),
        ("Admin bad requests", str(admin.get("bad_requests", 0))),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _status(replica: Mapping[str, Any]) -> Text:
    status = str(replica.get("status"))
    label = status
    if status == "different" and replica.get("version_status") == "identical":
        # a good copy of another version than the one new targets get: not a fault
        state = str(replica.get("version_state"))
        if replica.get("version_pending"):
            state += ", pending"
        return Text(f"version {replica.get('version')} ({state})", style="cyan")
    if status == "different":
        label += f" ({', '.join(replica.get('differences', ()))})"
    elif status == "pending":
        label += " (checking)"
    elif status == "damaged":
        label = damage_text(replica.get("damage") or {})
    return Text(label, style=_STATUS_STYLE.get(status, ""))


def damage_text(damage: Mapping[str, Any]) -> str:
    """``DAMAGED at 0x4000 (block 1), 3 bad blocks, found by scrub``: where to look, at once."""
    offset = damage.get("first_offset")
    label = "DAMAGED"
    if isinstance(offset, int) and offset >= 0:
        label += f" at offset {offset}"
        block_size = damage.get("block_size")
        if isinstance(block_size, int) and block_size > 0:
            label += f" (block {offset // block_size})"
    count = damage.get("bad_blocks")
    if isinstance(count, int) and count > 0:
        label += f", {count} bad block{'s' if count != 1 else ''}"
    found_by = damage.get("found_by")
    if found_by:
        label += f", found by {found_by}"
    since = damage.get("since")
    if isinstance(since, str) and since:
        label += f" since {_short_time(since)}"
    return label


def scrub_text(scrub: object) -> str:
    """The server's check of this copy: running (percent) or when it last finished."""
    if not isinstance(scrub, Mapping):
        return "-"
    done, total = scrub.get("done"), scrub.get("total")
    if scrub.get("running"):
        activity = str(scrub.get("activity") or "check")
        if isinstance(done, int) and isinstance(total, int) and total:
            return f"{activity} {100 * done / total:.0f}%"
        return activity
    finished = scrub.get("last_finished")
    if isinstance(finished, str) and finished:
        return f"checked {_short_time(finished)}"
    return "not yet"


def _settings_text(settings: Mapping[str, Any], differ: Sequence[str]) -> Text:
    parts = [str(settings.get("mode", "?"))]
    if settings.get("maintenance"):
        parts.append("maintenance")
    if settings.get("load_balancing", True):
        parts.append("any server")
    else:
        parts.append(f"only {settings.get('fixed_server') or '?'}")
    affinity = settings.get("subnet_affinity", "none")
    if affinity != "none":
        parts.append(f"affinity {affinity}")
    if settings.get("shared"):
        parts.append("shared store")
    text = Text(", ".join(parts))
    if differ:
        text.append(f"  differs: {', '.join(differ)}", style="red")
    return text


def _failover(vdisk: Mapping[str, Any], replica: Mapping[str, Any], candidates: set[str]) -> str:
    """Whether a target streaming this vDisk may move to this server when another fails."""
    if not vdisk.get("failover_allowed", False):
        return "off"  # load balancing off, maintenance, or a private image on local storage
    return "candidate" if replica.get("server") in candidates else "-"


def _counts(counts: Mapping[str, Any]) -> str:
    if not counts:
        return "0"
    total = sum(int(value) for value in counts.values())
    detail = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
    return f"{total} ({detail})"


def _number(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _ago(seconds: object, is_self: object) -> str:
    if is_self:
        return "(this server)"
    if not isinstance(seconds, int | float):
        return "never"
    return f"{seconds:.1f} s ago"


def _local_time(iso: str) -> str:
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _short_time(iso: str) -> str:
    """The local time of day for today's moments, the date and time for older ones."""
    try:
        moment = datetime.datetime.fromisoformat(iso).astimezone()
    except ValueError:
        return iso
    if moment.date() == datetime.datetime.now().astimezone().date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")
