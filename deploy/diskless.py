#!/usr/bin/env python3
"""Build a diskless Debian machine's image: a root file system for a vDisk, and the kernel and
initramfs that boot it with pvs-target inside (docs/diskless.md).

    python deploy/diskless.py build --workdir /var/tmp/pvs-diskless [--check]

Steps, each shown as it runs:

1. ``debootstrap`` a Debian tree with a kernel, systemd, initramfs-tools, nbd-client and
   Python (kept in WORKDIR/tree and reused while the package list is the same);
2. install pvs in a virtual environment, /opt/pvs, from wheels built here (``pip wheel``), so
   the tree needs no index of its own;
3. install the initramfs-tools hook and script (deploy/initramfs-tools) and make the initramfs;
4. with ``--check``, add the verifying workload the VM test and ``./scripts/demo vm`` run
   (deploy/diskless_check.py, a systemd service talking on the second serial port);
5. write WORKDIR/out/root.img (ext4, the vDisk's content), vmlinuz and initrd.img.

Run as root (debootstrap, chroot). Nothing outside WORKDIR changes.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INITRAMFS_TOOLS = Path(__file__).resolve().parent / "initramfs-tools"
CHECK = Path(__file__).resolve().parent / "diskless_check.py"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "busybox", "zstd", "systemd-sysv", "udev", "kmod",
    "iproute2", "procps", "nbd-client", "python3", "python3-venv",
)
CHECK_FILES = 48
"""Files of 1 MiB of random bytes the workload reads back and checks on every pass."""
SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class BuildError(Exception):
    """A step failed; the message names it and what to do."""


class Unreachable(BuildError):
    """The Debian mirror or the Python package index could not be used: this machine cannot
    build the image now (a test skips rather than fails)."""


def step(message: str) -> None:
    print(f"diskless: {message}", file=sys.stderr, flush=True)


def run(*command: str | Path, chroot: Path | None = None) -> None:
    """Run a command here, or in the tree with a clean environment (nothing of this
    machine's settings leaks into the image)."""
    argv = [str(part) for part in command]
    env = None
    if chroot is not None:
        argv = ["chroot", str(chroot), *argv]
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-20:])
        raise BuildError(f"{' '.join(argv)} failed (exit {result.returncode}):\n{tail}")


def base_key(suite: str, mirror: str) -> str:
    return hashlib.sha256(" ".join((suite, mirror, *PACKAGES)).encode()).hexdigest()[:16]


def debootstrap(tree: Path, suite: str, mirror: str) -> None:
    key = base_key(suite, mirror)
    marker = tree / ".pvs-base"
    if marker.exists() and marker.read_text() == key:
        step(f"reusing the Debian tree in {tree}")
        return
    if tree.exists():
        shutil.rmtree(tree)
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap not found: apt-get install debootstrap")
    step(f"debootstrap {suite} into {tree} (a few minutes: about 300 MB from {mirror})")
    started = time.monotonic()
    try:
        run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, tree,
            mirror)
    except BuildError as error:
        raise Unreachable(f"debootstrap from {mirror}: {error}") from None
    marker.write_text(key)
    step(f"Debian tree ready in {time.monotonic() - started:.0f} s")


def install_pvs(tree: Path, workdir: Path) -> None:
    """pvs and what it needs, as wheels built on this machine: the tree uses them offline."""
    wheels = workdir / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    step("building pvs's wheels (pip wheel)")
    try:
        # pure Python (PVS_PURE, setup.py): the image's interpreter is Debian's, not the one
        # that would compile the hot path here
        run("env", "PVS_PURE=1", sys.executable, "-m", "pip", "wheel", "-q", "-w", wheels, ROOT)
    except BuildError as error:  # the checkout itself installs: the package index failed
        raise Unreachable(f"pip wheel (pvs and its dependencies): {error}") from None
    inside = tree / "tmp" / "pvs-wheels"
    if inside.exists():
        shutil.rmtree(inside)
    shutil.copytree(wheels, inside)
    if not (tree / "opt" / "pvs" / "bin" / "python").exists():
        run("python3", "-m", "venv", "/opt/pvs", chroot=tree)
    step("installing pvs in /opt/pvs of the tree")
    run("/opt/pvs/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/pvs-wheels",
        "--force-reinstall", "pvs", chroot=tree)
    shutil.rmtree(inside)
    for name in ("pvs-target", "pvsctl"):
        link = tree / "usr" / "local" / "bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to(f"/opt/pvs/bin/{name}")


def configure(tree: Path) -> None:
    """What a diskless machine's root needs: its root is given by the initramfs, the network
    that carries it is the initramfs's and must be left alone."""
    (tree / "etc" / "fstab").write_text(
        "# The root is the vDisk attached by pvs-target in the initramfs (docs/diskless.md).\n"
        "/dev/nbd0  /  ext4  defaults,noatime  0  0\n"
    )
    (tree / "etc" / "hostname").write_text("pvs-diskless\n")
    for path in ("etc/resolv.conf",):
        (tree / path).unlink(missing_ok=True)
    hooks = tree / "etc" / "initramfs-tools"
    (hooks / "conf.d" / "pvs").write_text(
        "# A diskless machine needs its network drivers, not its disk controllers'.\n"
        "MODULES=netboot\n"
        "# The root is not there when the initramfs is made: say what it will be.\n"
        "FSTYPE=ext4\n"
    )
    shutil.copy2(INITRAMFS_TOOLS / "hooks" / "pvs", hooks / "hooks" / "pvs")
    shutil.copy2(INITRAMFS_TOOLS / "scripts" / "local-top" / "pvs",
                 hooks / "scripts" / "local-top" / "pvs")
    # Root login on the serial console without a password: a test machine only.
    run("passwd", "-d", "root", chroot=tree)


def add_check(tree: Path) -> None:
    data = tree / "var" / "lib" / "pvs-check"
    if not (data / "SHA256SUMS").exists():
        step(f"writing the workload's {CHECK_FILES} MiB of checked files")
        data.mkdir(parents=True, exist_ok=True)
        sums = []
        for index in range(CHECK_FILES):
            content = os.urandom(1 << 20)
            (data / f"f{index:03}").write_bytes(content)
            sums.append(f"{hashlib.sha256(content).hexdigest()}  f{index:03}\n")
        (data / "SHA256SUMS").write_text("".join(sums))
    shutil.copy2(CHECK, tree / "usr" / "local" / "sbin" / "pvs-check")
    (tree / "usr" / "local" / "sbin" / "pvs-check").chmod(0o755)
    unit = tree / "etc" / "systemd" / "system" / "pvs-check.service"
    unit.write_text(
        "[Unit]\nDescription=pvs verifying workload (tests and demo)\n"
        "After=local-fs.target\n\n"
        "[Service]\nExecStart=/usr/local/sbin/pvs-check /dev/ttyS1\n"
        "StandardOutput=journal+console\nStandardError=journal+console\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    wants = tree / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "pvs-check.service"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/systemd/system/pvs-check.service")


def make_initramfs(tree: Path, out: Path) -> str:
    kernels = sorted((tree / "lib" / "modules").iterdir())
    if not kernels:
        raise BuildError(f"no kernel in {tree}/lib/modules: remove {tree} and build again")
    version = kernels[-1].name
    step(f"making the initramfs for kernel {version} (about half a minute)")
    proc = tree / "proc"
    run("mount", "-t", "proc", "proc", proc)
    try:
        run("mkinitramfs", "-o", f"/boot/initrd.img-{version}", version, chroot=tree)
    finally:
        run("umount", proc)
    shutil.copy2(tree / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    shutil.copy2(tree / "boot" / f"initrd.img-{version}", out / "initrd.img")
    return version


def make_root_image(tree: Path, out: Path, size: str) -> None:
    image = out / "root.img"
    image.unlink(missing_ok=True)
    step(f"writing the root file system to {image} ({size}, ext4)")
    run("mkfs.ext4", "-q", "-F", "-L", "pvs-root", "-d", tree, image, size)


def build(workdir: Path, *, check: bool, size: str, suite: str, mirror: str) -> Path:
    if os.geteuid() != 0:
        raise BuildError("run as root: debootstrap and chroot need it")
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step(f"waiting for another build in {workdir} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(workdir, check=check, size=size, suite=suite, mirror=mirror)


def _build(workdir: Path, *, check: bool, size: str, suite: str, mirror: str) -> Path:
    tree, out = workdir / "tree", workdir / "out"
    out.mkdir(exist_ok=True)
    debootstrap(tree, suite, mirror)
    install_pvs(tree, workdir)
    configure(tree)
    if check:
        add_check(tree)
    make_initramfs(tree, out)
    make_root_image(tree, out, size)
    step(f"done: {out}/vmlinuz, {out}/initrd.img, {out}/root.img")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diskless.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="build the tree, the initramfs and root.img")
    make.add_argument("--workdir", type=Path, default=Path("/var/tmp/pvs-diskless"))
    make.add_argument("--check", action="store_true",
                      help="add the verifying workload (tests, demo)")
    make.add_argument("--size", default="2G", help="size of root.img (default %(default)s)")
    make.add_argument("--suite", default=SUITE)
    make.add_argument("--mirror", default=MIRROR)
    args = parser.parse_args(argv)
    try:
        build(args.workdir, check=args.check, size=args.size, suite=args.suite,
              mirror=args.mirror)
    except BuildError as error:
        print(f"diskless: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
