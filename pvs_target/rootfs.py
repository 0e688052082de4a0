"""A target that holds the machine's own root file system (``attach --root-storage``).

On a diskless machine pvs-target is started by the initramfs, before the root is mounted, and
every block the machine reads afterwards passes through it. It must outlive everything that
would end an ordinary process, and never wait on the I/O it serves:

- systemd's final killing spree at shutdown spares processes whose ``argv[0]`` starts with
  ``@`` (systemd's "root storage daemons" convention, also kept by iscsid and nbd-client); the
  root is then remounted read-only and synced through us, so we must still be there;
- SIGTERM and SIGINT are logged and ignored: stopping this process takes the root away;
- the kernel may need our help to write back dirty pages when memory is short, so memory we
  allocate must not wait on that writeback (``PR_SET_IO_FLUSHER``), and the OOM killer must
  choose anything but us (``oom_score_adj`` -1000).
"""

from __future__ import annotations

import ctypes
import os
import sys

import structlog

ARGV0 = "@pvs-target"
PR_SET_IO_FLUSHER = 57
"""Linux 5.6: the task's allocations neither do nor wait for filesystem or block I/O."""

log = structlog.get_logger("pvs_target")


def exec_as_root_storage() -> None:
    """Start again under ``@pvs-target`` unless already so: argv[0] is what systemd reads,
    and only exec sets it. Returns only when nothing is to be done."""
    with open("/proc/self/cmdline", "rb") as cmdline:
        current = cmdline.read().split(b"\0", 1)[0]
    if current.startswith(b"@"):
        return
    # Python finds its library from its own path, which an argv[0] like "@pvs-target" no
    # longer gives: pass it on so the new process starts as this one did.
    os.environ.setdefault("PYTHONEXECUTABLE", sys.executable)
    os.execv(sys.executable, [ARGV0, *sys.orig_argv[1:]])


def protect() -> list[str]:
    """Apply what can be applied; name what could not (the caller logs it as a warning)."""
    problems = []
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        problems.append(f"PR_SET_IO_FLUSHER: {os.strerror(ctypes.get_errno())} (Linux 5.6 and "
                        "CAP_SYS_RESOURCE needed; under memory pressure writeback may wait on us)")
    try:
        with open("/proc/self/oom_score_adj", "w") as adjust:
            adjust.write("-1000")
    except OSError as error:
        problems.append(f"oom_score_adj: {error.strerror} (the OOM killer may choose us)")
    return problems
