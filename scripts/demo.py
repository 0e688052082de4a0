"""The main job, end to end on one machine: a three-server site, targets, failovers shown.

As root, where network namespaces work, the site is the lab of deploy/lab.py: three server
hosts and four target hosts on two subnets, each in its own namespace, so every packet crosses
a real (virtual) network. Otherwise, each server listens on its own loopback address
(127.0.0.11-13), as on separate hosts. The
vDisk is replicated to each server's local store with its identity kept (cp -p), the target
attaches it as an NBD export, a reader copies the whole disk through the export over and over,
and we stop the streaming server's stream service, then kill the next one, while it reads.
Everything started here is stopped here, by PID, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORK = ROOT / "demo"
SERVERS = [("pvs1", "127.0.0.11", 1.0), ("pvs2", "127.0.0.12", 1.0), ("pvs3", "127.0.0.13", 2.0)]
PORT = 6910
SIZE = 256 * 1024 * 1024
processes: list[subprocess.Popen[bytes]] = []


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*args: str, check: bool = True) -> str:
    print(f"$ {' '.join(args)}", flush=True)
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    print(output.rstrip())
    if check and result.returncode != 0:
        raise SystemExit(f"demo: {args[0]} failed (exit {result.returncode})")
    return result.stdout


def start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT)
    processes.append(process)
    return process


def wait_for(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: {path.name} never said {text!r}; see {path}")


def status() -> dict[str, object]:
    out = subprocess.run(
        [str(BIN / "pvs-target"), "status", "--control", str(WORK / "target.sock"), "--json"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def streaming_server() -> tuple[str, str]:
    server = status()["server"]
    assert isinstance(server, dict)
    return server["name"], server["address"]


def main() -> int:
    pvsctl = str(BIN / "pvsctl")
    key = WORK / "site.key"
    key.write_text(run(pvsctl, "site", "keygen"))
    key.chmod(0o600)

    say("A vDisk of random data, replicated to three servers' local stores (cp -p)")
    source = WORK / "base.img"
    with source.open("wb") as handle:
        for _ in range(SIZE // (1 << 20)):
            handle.write(os.urandom(1 << 20))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    first = WORK / "pvs1"
    first.mkdir()
    run(pvsctl, "vdisk", "import", str(source), "--name", "demo", "--store", str(first))
    for name, _, _ in SERVERS[1:]:
        (WORK / name).mkdir()
        for file in first.glob("demo.*"):
            shutil.copy2(file, WORK / name / file.name)

    say("Three pvsd, one per loopback address; pvs3 has power rating 2")
    peers = [f"{host}:{PORT}" for _, host, _ in SERVERS]
    for name, host, power in SERVERS:
        args = [str(BIN / "pvsd"), "--name", name, "--listen", f"{host}:{PORT}",
                "--store", str(WORK / name), "--key-file", str(key), "--power", str(power),
                "--admin", f"{host}:{PORT + 1}"]
        for peer in peers:
            if peer != f"{host}:{PORT}":
                args += ["--peer", peer]
        start(*args, log=WORK / f"{name}.log")
    for name, _, _ in SERVERS:
        wait_for(WORK / f"{name}.log", "identity_published")
    time.sleep(1.5)  # a few heartbeats, so every server sees the whole site
    admin = ["--admin", f"127.0.0.11:{PORT + 1}", "--key-file", str(key)]
    run(pvsctl, *admin, "servers")
    run(pvsctl, *admin, "vdisks")

    say("Attach the vDisk on a target, exported over NBD")
    nbd = WORK / "nbd.sock"
    start(str(BIN / "pvs-target"), "attach", "--server", peers[0], "--vdisk", "demo",
          "--device-id", "demo-target", "--nbd", f"unix:{nbd}",
          "--control", str(WORK / "target.sock"), log=WORK / "target.log")
    wait_for(WORK / "target.log", '"event": "attached"')
    run(str(BIN / "pvs-target"), "status", "--control", str(WORK / "target.sock"))
    run(pvsctl, *admin, "targets")

    say("A reader copies the whole disk through the export, again and again")
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, f"nbd+unix:///?socket={nbd}", digest, "6"],
        stdout=subprocess.PIPE, text=True,
    )
    processes.append(reader)  # type: ignore[arg-type]
    time.sleep(1.0)

    name, address = streaming_server()
    say(f"Stop the stream service of {name} ({address}), the streaming server")
    run(pvsctl, *admin, "stop-stream", name)
    time.sleep(1.0)
    moved_to, new_address = streaming_server()
    print(f"the target now streams from {moved_to} at {new_address}")

    say("A new version while the target streams: made, promoted, copied to every server")
    for command in (("vdisk", "version", "new", "demo"),
                    ("vdisk", "version", "promote", "demo", "--to", "production"),
                    ("vdisk", "replicate", "demo", "--all"),
                    ("vdisk", "versions", "demo")):
        run(pvsctl, *admin, *command)
    print("the running target keeps version 1 until it boots again; new logins get version 2")

    say(f"Kill {moved_to} (SIGKILL), as a crash would")
    pid = next(p.pid for p in processes if f"--name {moved_to}" in " ".join(map(str, p.args)))
    os.kill(pid, signal.SIGKILL)
    time.sleep(3.0)
    run(str(BIN / "pvs-target"), "status", "--control", str(WORK / "target.sock"))

    say("The reader's verdict")
    out, _ = reader.communicate(timeout=300)
    print(out.rstrip())
    ok = reader.returncode == 0
    say("Done: " + ("every byte read was right" if ok else "READ ERRORS"))
    return 0 if ok else 1


READER = """
import hashlib, subprocess, sys
uri, want, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
bad = 0
for n in range(rounds):
    p = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120)
    got = hashlib.sha256(p.stdout).hexdigest()
    fine = p.returncode == 0 and got == want
    bad += not fine
    print(f"copy {n + 1}: exit {p.returncode}, sha256 {got[:16]}..., "
          + ("correct" if fine else "WRONG"), flush=True)
sys.exit(1 if bad else 0)
"""


def lab_usable() -> bool:
    if os.geteuid() != 0 or os.environ.get("PVS_DEMO") == "loopback":
        return False
    probe = "pvsdemo-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return made.returncode == 0


def lab_main() -> int:
    sys.path.insert(0, str(ROOT / "deploy"))
    from lab import VDISK, Lab

    lab = Lab(WORK / "lab", servers=3, targets=4, subnets=2, size=64 * 1024 * 1024)
    try:
        say("The lab: 3 server hosts, 4 target hosts, 2 subnets, each in its own namespace")
        lab.up()
        for target in lab.state.targets:
            lab.start_reader(target.name, seconds=60)
        time.sleep(2.0)
        show_lab(lab)
        first = lab.target_status("t1")["server"]
        say(f"t1 streams from {first['name']} at {first['address']}: cut that host's link")
        lab.cut(first["name"])
        time.sleep(3.0)
        now = lab.target_status("t1")["server"]
        print(f"t1 now streams from {now['name']} at {now['address']}")
        say(f"Stop the stream service of {now['name']} (pvsctl stop-stream)")
        print(lab.stop_stream(now["name"]))
        time.sleep(2.0)
        lab.restore(first["name"])
        show_lab(lab)
        say("A new version while the targets stream: made, promoted, copied to every server")
        for command in (("vdisk", "version", "new", VDISK),
                        ("vdisk", "version", "promote", VDISK, "--to", "production"),
                        ("vdisk", "replicate", VDISK, "--all"),
                        ("vdisk", "versions", VDISK)):
            print(f"$ pvsctl {' '.join(command)}")
            print(lab.site_command(*command).rstrip())
        print("running targets keep version 1 until they boot again; new logins get version 2")
        run(str(BIN / "pvs-target"), "status", "--control", str(lab.control(lab.host("t1"))))
        say("The readers' verdict (each read the whole vDisk through its NBD export)")
        reports = lab.stop_readers()
        bad = 0
        for name, report in sorted(reports.items()):
            errors = len(report["errors"]) + len(report["mismatches"])
            bad += errors
            print(f"{name}: {report['passes']} passes, {report['good_passes']} correct, "
                  f"{errors} errors")
        say("Done: " + ("every byte read was right" if bad == 0 and reports else "READ ERRORS"))
        return 0 if bad == 0 and reports else 1
    finally:
        lab.down()


def vm_main() -> int:
    """``./scripts/demo vm``: a diskless machine boots from the site, through two failovers."""
    sys.path.insert(0, str(ROOT / "deploy"))
    import diskless
    import vm

    if os.geteuid() != 0:
        print("demo vm: run as root (the image is built with debootstrap and chroot)")
        return 2
    missing = vm.missing_tools()
    if missing:
        print(f"demo vm: missing {', '.join(missing)}: apt-get install qemu-system-x86 socat "
              "debootstrap e2fsprogs")
        return 2
    say("A Debian image with pvs-target in its initramfs (kept in /var/tmp/pvs-diskless)")
    try:
        image = diskless.build(
            Path(os.environ.get("PVS_DISKLESS_WORKDIR", "/var/tmp/pvs-diskless")),
            check=True, size="2G", suite=diskless.SUITE, mirror=diskless.MIRROR,
        )
    except diskless.BuildError as error:
        print(f"demo vm: building the image: {error}")
        return 2
    with vm.running(WORK / "vm", image, cmdline="console=ttyS0 panic=-1") as (site, machine):
        print(site.pvsctl("servers").rstrip())
        say(f"A VM with no disk boots over the network ({machine.accel}); its only network "
            f"reaches the three servers; iPXE fetches {site.boot_url}")
        started = time.monotonic()
        machine.wait_for(r"^READY", 900)
        print(f"systemd started the workload {time.monotonic() - started:.0f} s after power-on;"
              f" the machine's console is in {machine.console}")
        show_machine(machine.status(240))
        memory = machine.memory(240)
        print(f"memory: pvs-target {memory['pvs-target_rss_kib'] >> 10} MiB resident, its "
              f"runtime {memory['runtime_tmpfs_kib'] >> 10} MiB in RAM, "
              f"{memory['available_kib'] >> 10} of {memory['total_kib'] >> 10} MiB available")
        machine.passes(2, 240)
        first = machine.status(240)["server"]["name"]
        say(f"Stop the stream service of {first}, the machine's server (pvsctl stop-stream)")
        site.pvsctl("stop-stream", first)
        machine.passes(3, 240)
        status = machine.status(240)
        show_machine(status)
        second = status["server"]["name"]
        say(f"Kill {second} (SIGKILL), as a crash would")
        site.kill(second)
        machine.passes(3, 240)
        show_machine(machine.status(240))
        say("Stop the workload and power the machine off")
        machine.send("stop")
        done = machine.wait_for(r"^STOPPED (\d+) errors (\d+)$", 240)
        machine.send("poweroff")
        machine.wait_exit(240)
        errors = machine.console_errors()
        for line in errors:
            print(f"console: {line}")
        print(f"{done.group(1)} passes, {done.group(2)} errors in the machine; "
              f"{len(errors)} I/O errors on its console")
        ok = done.group(2) == "0" and not errors
    say("Done: " + ("every byte the machine read was right" if ok else "ERRORS"))
    return 0 if ok else 1


def show_machine(status: dict[str, object]) -> None:
    """What ``pvs-target status`` in the machine says, in one paragraph."""
    server = status.get("server") or {}
    identity = status.get("identity") or {}
    failovers = status.get("failovers") or []
    assert isinstance(server, dict) and isinstance(identity, dict) and isinstance(failovers, list)
    print(f"pvs-target status in the machine: {status.get('state')} from {server.get('name')} "
          f"at {server.get('address')}, version {identity.get('version')}, "
          f"{status.get('bytes_read', 0) // (1 << 20)} MiB read, {len(failovers)} failovers")
    for record in failovers:
        print(f"  {record['from']['name']} -> {record['to']['name']}: {record['reason']}, "
              f"{record['took_ms']:.0f} ms")


def show_lab(lab: object) -> None:
    status = lab.status()  # type: ignore[attr-defined]
    for target in status["targets"]:
        server = target.get("server") or {}
        print(f"target {target['name']} ({target['address']}, subnet {target['subnet']}): "
              f"streams from {server.get('name')} at {server.get('address')}, "
              f"{len(target.get('failovers', []))} failovers")


if __name__ == "__main__":
    try:
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir()
        chosen = vm_main if sys.argv[1:] == ["vm"] else lab_main if lab_usable() else main
        code = chosen()
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    sys.exit(code)
