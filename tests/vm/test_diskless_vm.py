"""A machine with no disk boots Debian from a vDisk and keeps running through failovers.

qemu starts a VM with no disk and a user-mode network that reaches nothing but a loopback
site of three pvsd. Its firmware (iPXE) gets the kernel and initramfs from pvsd over HTTP;
the initramfs attaches the vDisk with pvs-target and mounts it as the root; systemd boots and
starts the workload, which reads back checked files and writes, syncs and rereads new ones
on every pass, reporting on a serial port. The stream service of the machine's server is
stopped, then the server it moved to is killed: the workload sees no error and no wrong
byte, the console shows no I/O error, and the machine shuts down cleanly with pvs-target
still serving the root until the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vm

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

BOOT = 600.0
"""Seconds to the workload's first line: about 2 minutes under software emulation."""
STEP = 240.0
"""Seconds for a few passes of the workload or a status answer."""


def test_diskless_machine_boots_from_the_site_and_survives_failovers(
    diskless_image: Path, tmp_path: Path
) -> None:
    with vm.running(tmp_path, diskless_image, cmdline="console=ttyS0 panic=-1") as (
        site, machine
    ):
        machine.wait_for(r"^READY", BOOT)
        status = machine.status(STEP)
        assert status["state"] == "streaming" and status["read_only"] is True
        assert status["verification"]["enabled"] is True
        first = status["server"]["name"]
        memory = machine.memory(STEP)
        assert memory["pvs-target_rss_kib"] > 0 and memory["runtime_tmpfs_kib"] > 0
        version = status["identity"]["version"]
        machine.passes(2, STEP)

        # A failover may also happen on its own when software emulation starves the machine
        # for longer than --dead-after: the checks count the records, not their positions.
        before = len(status["failovers"])
        site.pvsctl("stop-stream", first)
        machine.passes(3, STEP)
        status = machine.status(STEP)
        second = status["server"]["name"]
        assert second != first  # first no longer streams: nothing can go back to it
        assert first in [f["from"]["name"] for f in status["failovers"][before:]]
        assert status["identity"]["version"] == version

        before = len(status["failovers"])
        site.kill(second)
        machine.passes(3, STEP)
        status = machine.status(STEP)
        third = status["server"]["name"]
        assert third not in (first, second)
        assert second in [f["from"]["name"] for f in status["failovers"][before:]]
        assert status["verification"]["mismatches"] == []
        assert status["verification"]["blocks_checked"] > 0

        machine.send("stop")
        stopped = machine.wait_for(r"^STOPPED (\d+) errors (\d+)$", STEP)
        assert int(stopped.group(2)) == 0 and int(stopped.group(1)) >= 8
        machine.send("poweroff")
        assert machine.wait_exit(STEP) == 0
    console = machine.console.read_text(errors="replace")
    assert "reboot: Power down" in console
    assert machine.console_errors() == []
