#!/usr/bin/env python3
"""A diskless virtual machine booting from a loopback site of three pvsd: the VM test
(tests/vm) and ``./scripts/demo vm`` share it.

The machine has no disk. Its only network is qemu's user-mode network with ``restrict=on``:
it reaches nothing but the addresses forwarded to the site, 10.0.2.11-13, each the stream and
boot ports of one pvsd on 127.0.0.11-13 (a ``socat`` per connection). Its firmware (iPXE, in
qemu's network ROM) gets ``http://10.0.2.11:BOOT/boot/debian.ipxe`` from DHCP, and pvsd's
boot script gives it the kernel and initramfs of the vDisk's version and the command line
that attaches the vDisk in the initramfs (deploy/initramfs-tools). The servers advertise the
10.0.2.x addresses, so the machine follows redirects and fails over like any target.

The image comes from ``deploy/diskless.py build --check``; its workload
(deploy/diskless_check.py) reports on the second serial port, which :class:`Machine` reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VDISK = "debian"
SERVERS = (("pvs1", "127.0.0.11", "10.0.2.11"), ("pvs2", "127.0.0.12", "10.0.2.12"),
           ("pvs3", "127.0.0.13", "10.0.2.13"))
"""Name, loopback address, and the address the machine reaches it at."""
BIN = Path(sys.executable).parent
KVM_PROBE = 20.0
CONSOLE_ERRORS = re.compile(
    r"I/O error|Buffer I/O|blk_update_request|EXT4-fs error|EXT4-fs warning|Remounting "
    r"filesystem read-only|nbd\d+: (?:Connection timed out|Receive control failed|Dead "
    r"connection)|Possible stuck request|Kernel panic|Traceback|FAILED"
)
"""What the machine's console must never show: an I/O error that reached the file system, a
request the kernel waited 30 s for, a unit that failed (the unmounting of pvs-target's own
file system at shutdown, say)."""


class VmError(Exception):
    """The machine or the site failed; the message says what, and where its log is."""


def accelerator(kernel: Path, workdir: Path) -> str:
    """``kvm`` where it works, else ``tcg`` (software emulation, several times slower).

    An openable /dev/kvm is not enough: under some nested hypervisors a KVM guest hangs
    before printing anything. So the kernel is started once without a root, for at most
    ``KVM_PROBE`` seconds: under working KVM it prints its banner, panics and stops at once.
    ``PVS_VM_ACCEL=kvm|tcg`` skips the probe.
    """
    chosen = os.environ.get("PVS_VM_ACCEL", "")
    if chosen in ("kvm", "tcg"):
        return chosen
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    console = workdir / "kvm-probe.log"
    console.unlink(missing_ok=True)
    probe = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "kvm", "-cpu", "host",
         "-m", "256", "-no-reboot", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
         "-serial", f"file:{console}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        probe.wait(timeout=KVM_PROBE)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
    banner = console.exists() and "Linux version" in console.read_text(errors="replace")
    return "kvm" if banner else "tcg"


def missing_tools() -> list[str]:
    return [tool for tool in ("qemu-system-x86_64", "socat", "debootstrap", "mkfs.ext4")
            if shutil.which(tool) is None]


def _free_port(hosts: list[str]) -> int:
    """A port P with TCP P, P+1, P+2 and UDP P free on every host (stream and coordination,
    admin, boot)."""
    for _ in range(200):
        port = random.randrange(20000, 40000)
        try:
            for host in hosts:
                for offset, kind in ((0, socket.SOCK_STREAM), (0, socket.SOCK_DGRAM),
                                     (1, socket.SOCK_STREAM), (2, socket.SOCK_STREAM)):
                    with socket.socket(socket.AF_INET, kind) as probe:
                        probe.bind((host, port + offset))
        except OSError:
            continue
        return port
    raise VmError("no free port on 127.0.0.11-13")


class Site:
    """Three pvsd on one shared store holding the image as vDisk ``debian`` with its boot
    files; every process is ended by its PID in :meth:`close`."""

    def __init__(self, workdir: Path, image: Path, *, cmdline: str = "") -> None:
        self.workdir = workdir
        self.image = image
        self.cmdline = cmdline
        self.store = workdir / "store"
        self.key = workdir / "site.key"
        self.port = _free_port([host for _, host, _ in SERVERS])
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def admin(self, name: str = "pvs1") -> str:
        host = next(host for server, host, _ in SERVERS if server == name)
        return f"{host}:{self.port + 1}"

    def pvsctl(self, *args: str, server: str = "pvs1") -> str:
        command = [str(BIN / "pvsctl"), "--admin", self.admin(server), "--key-file",
                   str(self.key), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise VmError(f"pvsctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def prepare(self) -> None:
        """The store: the root image as a vDisk (its manifest made here), the kernel and the
        initramfs as its boot files."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(exist_ok=True)
        keygen = subprocess.run([str(BIN / "pvsctl"), "site", "keygen"], capture_output=True,
                                text=True, check=True)
        self.key.write_text(keygen.stdout)
        self.key.chmod(0o600)
        subprocess.run([str(BIN / "pvsctl"), "vdisk", "import", str(self.image / "root.img"),
                        "--name", VDISK, "--store", str(self.store)], check=True)
        shutil.copy2(self.image / "vmlinuz", self.store / f"{VDISK}.vmlinuz")
        shutil.copy2(self.image / "initrd.img", self.store / f"{VDISK}.initrd")
        (self.store / f"{VDISK}.cmdline").write_text(self.cmdline + "\n")

    def start(self) -> None:
        peers = {name: f"{host}:{self.port}" for name, host, _ in SERVERS}
        for name, host, guest in SERVERS:
            self.start_server(name, host, guest, peers)
        for name, _, _ in SERVERS:
            self.wait_for_log(name, '"identity_published"')
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every server sees the others serving
            if self.pvsctl("servers").count("serving") >= len(SERVERS):
                return
            time.sleep(0.2)
        raise VmError(f"the site did not form: see {self.workdir}/pvs*.log")

    def start_server(self, name: str, host: str, guest: str, peers: dict[str, str]) -> None:
        command = [str(BIN / "pvsd"), "--name", name, "--listen", f"{host}:{self.port}",
                   "--advertise", f"{guest}:{self.port}", "--store", str(self.store),
                   "--key-file", str(self.key), "--admin", f"{host}:{self.port + 1}",
                   "--boot-listen", f"{host}:{self.port + 2}", "--log-json"]
        for other, address in peers.items():
            if other != name:
                command += ["--peer", address]
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(command, stdout=log, stderr=log)

    def wait_for_log(self, name: str, text: str, timeout: float = 60) -> None:
        path = self.workdir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in path.read_text(errors="replace"):
                return
            if self.processes[name].poll() is not None:
                raise VmError(f"{name} exited: see {path}")
            time.sleep(0.1)
        raise VmError(f"{name} did not log {text} within {timeout:g} s: see {path}")

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait()

    def guest_forwards(self) -> list[str]:
        """qemu ``guestfwd`` rules: each server's stream and boot port at its 10.0.2.x.

        socat's messages go to a file: qemu hands the command's stderr to the machine's
        connection too, where "2026/12/01 ... Connection refused" would be read as a frame."""
        log = self.workdir / "socat.log"
        rules = []
        for _, host, guest in SERVERS:
            for port in (self.port, self.port + 2):
                rules.append(f"guestfwd=tcp:{guest}:{port}-cmd:socat -lf {log} STDIO "
                             f"TCP:{host}:{port}")
        return rules

    @property
    def boot_url(self) -> str:
        return f"http://{SERVERS[0][2]}:{self.port + 2}/boot/{VDISK}.ipxe"

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Machine:
    """The qemu process: no disk, network boot, console on ttyS0 (a file), the workload's
    channel on ttyS1 (a unix socket)."""

    def __init__(self, workdir: Path, site: Site, *, memory_mib: int = 1024) -> None:
        self.workdir = workdir
        self.site = site
        self.console = workdir / "console.log"
        self.channel_path = workdir / "check.sock"
        self.accel = accelerator(site.image / "vmlinuz", workdir)
        self.memory_mib = memory_mib
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: socket.socket | None = None
        self.pending = b""
        self.transcript: list[str] = []

    @property
    def command(self) -> list[str]:
        network = ",".join(["user", "id=net0", "restrict=on", f"bootfile={self.site.boot_url}",
                            *self.site.guest_forwards()])
        cpu = "host" if self.accel == "kvm" else "max"
        return [
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", self.accel,
            "-cpu", cpu,
            "-m", str(self.memory_mib), "-smp", "2", "-no-reboot",
            "-netdev", network, "-device", "virtio-net-pci,netdev=net0", "-boot", "n",
            "-serial", f"file:{self.console}",
            "-serial", f"unix:{self.channel_path},server=on,wait=off",
        ]

    def start(self) -> None:
        self.channel_path.unlink(missing_ok=True)
        with (self.workdir / "qemu.log").open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not self.channel_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise VmError(f"qemu did not start: see {self.workdir}/qemu.log")
            time.sleep(0.05)
        self.channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel.connect(str(self.channel_path))

    def lines(self, timeout: float) -> Iterator[str]:
        """The workload's lines as they come, until ``timeout`` seconds pass."""
        assert self.channel is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.pending:
                raw, self.pending = self.pending.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if line:
                    self.transcript.append(line)
                    yield line
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.process is not None and self.process.poll() is not None:
                raise VmError(f"the machine stopped: see {self.console}")
            self.channel.settimeout(min(left, 1.0))
            try:
                chunk = self.channel.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise VmError(f"the machine's channel closed: see {self.console}")
            self.pending += chunk.replace(b"\r", b"")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        expression = re.compile(pattern)
        for line in self.lines(timeout):
            if line.startswith("FAIL"):
                raise VmError(f"the workload failed: {line}")
            match = expression.search(line)
            if match:
                return match
        raise VmError(f"no line matching {pattern!r} within {timeout:g} s: see {self.console}")

    def send(self, command: str) -> None:
        assert self.channel is not None, "start() first"
        self.channel.sendall(command.encode() + b"\n")

    def status(self, timeout: float) -> dict[str, Any]:
        """``pvs-target status --json`` as the machine itself shows it."""
        self.send("status")
        line = self.wait_for(r"^STATUS ", timeout).string
        try:
            answer: dict[str, Any] = json.loads(line.removeprefix("STATUS "))
        except ValueError:
            raise VmError(f"pvs-target status on the machine: {line}") from None
        return answer

    def memory(self, timeout: float) -> dict[str, int]:
        """KiB: pvs-target's resident set, its runtime's tmpfs, the machine's total and
        available memory (deploy/diskless_check.py ``mem``)."""
        self.send("mem")
        words = self.wait_for(r"^MEM ", timeout).string.split()[1:]
        return {name: int(value) for name, value in zip(words[::2], words[1::2], strict=True)}

    def passes(self, count: int, timeout: float) -> int:
        """Wait for ``count`` more passes of the workload; the last pass number."""
        number = 0
        for _ in range(count):
            number = int(self.wait_for(r"^PASS (\d+) .* errors 0$", timeout).group(1))
        return number

    def console_errors(self) -> list[str]:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return [line for line in text.splitlines() if CONSOLE_ERRORS.search(line)]

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None, "start() first"
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running(workdir: Path, image: Path, *, cmdline: str) -> Iterator[tuple[Site, Machine]]:
    """A started site and a started (booting) machine, both ended on the way out."""
    site = Site(workdir, image, cmdline=cmdline)
    machine = Machine(workdir, site)
    try:
        site.prepare()
        site.start()
        machine.start()
        yield site, machine
    finally:
        machine.close()
        site.close()
