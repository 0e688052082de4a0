"""The write cache says when it fills: once as use passes 80, 90 and 100 % of the limit (100:
also a write refused), and again only after use has fallen well below a level."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from pvs_target.cache import CacheFull, WriteCache, fill_levels, rearmed_levels

PAGE = 4096
LIMIT = 100 * PAGE


def test_levels_reached_and_rearmed() -> None:
    assert fill_levels(79, 100) == frozenset()
    assert fill_levels(80, 100) == {80}
    assert fill_levels(95, 100) == {80, 90}
    assert fill_levels(100, 100) == {80, 90, 100}
    assert fill_levels(10, 100, refused=True) == {100}
    assert rearmed_levels(74, 100) == {80, 90, 100}
    assert rearmed_levels(75, 100) == {90, 100}
    assert rearmed_levels(94, 100) == {100}
    assert rearmed_levels(95, 100) == set()


def fills(logs: list[MutableMapping[str, Any]]) -> list[tuple[object, object]]:
    return [(entry["event"], entry["threshold"]) for entry in logs
            if entry["event"] in ("write_cache_filling", "write_cache_full")]


def test_each_level_is_said_once_as_the_cache_fills() -> None:
    cache = WriteCache("ram", 10 * LIMIT, LIMIT, page_size=PAGE)
    with capture_logs() as logs:
        cache.write(0, bytes(79 * PAGE))
        cache.write(79 * PAGE, bytes(PAGE))  # 80 %
        cache.write(80 * PAGE, bytes(5 * PAGE))  # 85 %: nothing new
        cache.write(0, bytes(85 * PAGE))  # rewritten in place: no page more
        cache.write(85 * PAGE, bytes(15 * PAGE))  # 100 %: 90 and 100 at once, said as 100
        with pytest.raises(CacheFull):
            cache.write(100 * PAGE, bytes(PAGE))
    assert fills(logs) == [("write_cache_filling", 80), ("write_cache_full", 100)]
    assert logs[-1]["log_level"] == "error" and "action" in logs[-1]
    assert cache.warned == {80, 90, 100} and cache.refused_writes == 1
    assert cache.status() == {
        "kind": "ram", "used": LIMIT, "limit": LIMIT, "percent": 100.0,
        "data_bytes": LIMIT, "refused_writes": 1,
    }


def test_a_refused_write_is_100_percent_once_until_space_is_freed() -> None:
    cache = WriteCache("ram", 10 * LIMIT, LIMIT, page_size=PAGE)
    cache.write(0, bytes(93 * PAGE))
    with capture_logs() as logs:
        for _ in range(3):
            with pytest.raises(CacheFull):
                cache.write(93 * PAGE, bytes(8 * PAGE))
        cache.trim(0, 30 * PAGE)  # 63 %: every level may be said again
        cache.write(0, bytes(20 * PAGE))  # 83 %
        with pytest.raises(CacheFull):
            cache.write(93 * PAGE, bytes(20 * PAGE))
    assert fills(logs) == [
        ("write_cache_full", 100), ("write_cache_filling", 80), ("write_cache_full", 100),
    ]
    assert cache.refused_writes == 4 and cache.percent == 83.0
