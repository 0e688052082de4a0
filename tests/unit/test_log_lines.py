"""pvsd's log lines, as another process sharing its stderr sees them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import structlog

from pvsd import logs


class _Writes:
    """A stream that keeps each write apart, as a file shared with other processes would see
    them interleaved."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_json_line_is_one_write_with_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    """pvsd and its stream workers write to one stderr: a line written apart from its newline
    let a worker's line land in the middle, and neither parsed."""
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        logs.configure(json=True, name="s1")
        structlog.get_logger("test").info("first", peer="127.0.0.2:1", reason="closed")
        structlog.get_logger("test").warning("second", holding_most=["a" * 5000])
    finally:
        structlog.reset_defaults()
    assert len(stream.writes) == 2
    for text in stream.writes:
        assert text.endswith("\n") and text.count("\n") == 1
        assert json.loads(text)["server"] == "s1"


def test_lines_of_processes_sharing_a_file_never_mix(tmp_path: object) -> None:
    """Four processes log 2,000 lines each, all to one file opened for appending (as pvsd's
    workers inherit its stderr): every line parses."""
    program = (
        "import sys, structlog\n"
        "from pvsd import logs\n"
        "logs.configure(json=True, name=sys.argv[1])\n"
        "for n in range(2000):\n"
        "    structlog.get_logger().info('line', n=n, pad='x' * 300)\n"
    )
    path = f"{tmp_path}/shared.log"
    with open(path, "ab") as shared:
        children = [
            subprocess.Popen([sys.executable, "-c", program, f"p{index}"], stderr=shared)
            for index in range(4)
        ]
        for child in children:
            assert child.wait(timeout=60) == 0
    with open(path, encoding="utf-8") as log_file:
        lines = log_file.read().splitlines()
    assert len(lines) == 8000
    assert sorted(json.loads(line)["server"] for line in lines) == sorted(
        f"p{index}" for index in range(4) for _ in range(2000)
    )
