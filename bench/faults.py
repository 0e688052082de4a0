"""Issue 11's figures: for each fault, the wait an outside NBD reader saw and what the status says.

    .venv/bin/python bench/faults.py [--size 64M] [--depth 4] [--json OUT]

For each fault a fresh loopback site is started (three ``pvsd`` on 127.0.0.41-43, each with a
hard link of one random image and its manifest), ``pvs-target attach --nbd unix:SOCK`` with
its default settings in front of it, and an outside NBD reader in this process keeps
``--depth`` reads of 64 KiB in flight at random offsets, timing each read itself (from writing
its request to decoding its reply) and checking every byte. Then the fault:

- stuck: a fake server (this script, ``--fake stuck``) that answers HELLO, LOGIN and KEEPALIVE
  but never a READ or DIGESTS, given to the target first, the site after it;
- drip: a fake server that sends its read replies one byte every 0.3 s;
- stalled store: the streaming server's store is ext4 on a loop device over nbdfuse over
  ``nbdkit --filter=pause`` (as tests/integration/test_server_stalls.py does where there is
  no device-mapper); the image's pages are dropped from the page cache and nbdkit paused, so
  every read that misses the cache hangs in the kernel. Needs root, nbdkit, nbdfuse,
  losetup and mkfs.ext4; skipped with the reason otherwise;
- SIGSTOP, SIGKILL: of the streaming pvsd;
- stop-stream: ``pvsctl stop-stream`` of the streaming server, through another's admin API.

The table shows per fault: the longest read wait the outside reader saw, the failover's
``longest_wait_ms`` from ``pvs-target status``, its ``took_ms`` and ``detected_after_ms``, and
the reads that failed (the bar is 0). Targets from the issue: stop-stream <= 100 ms, every
other fault <= 2 s. Every process is started through ``procs.Children`` and ended by its pid;
every wait and every loop is bounded in time and in count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procs import Child, Children, Site, children, free_port, link_store, start_attach, until
from stream import MIB, _run, machine, make_store, parse_size, python_environment, revision

from pvs_target.nbd.client import NbdClient, NbdFailed

HERE = Path(__file__).resolve().parent
HOSTS = ("127.0.0.41", "127.0.0.42", "127.0.0.43")
FAKE_HOST = "127.0.0.44"
FAULTS = ("stuck", "drip", "stalled store", "SIGSTOP", "SIGKILL", "stop-stream")
TARGET_MS = {"stop-stream": 100.0}
"""The issue's targets for the longest wait; every other fault: 2 s."""
LEAD = 2.0
"""Seconds of reading before the fault."""
AFTER = 2.0
"""Seconds of reading after the failover is in the status."""
DRIP_INTERVAL = 0.3
READ_LENGTH = 64 * 1024
MAX_READS = 500_000


# -- the outside NBD reader -------------------------------------------------------------------


@dataclass
class Load:
    """``depth`` workers reading through ``client`` until stopped, at most ``MAX_READS``."""

    client: NbdClient
    expected: bytes
    depth: int
    waits: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wrong: int = 0
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    issued: int = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(seed) for seed in range(self.depth)))

    async def _worker(self, seed: int) -> None:
        chooser = random.Random(seed)
        slots = len(self.expected) // READ_LENGTH
        while not self.stopped.is_set() and self.issued < MAX_READS:
            self.issued += 1
            offset = chooser.randrange(slots) * READ_LENGTH
            try:
                data, wait = await self.client.read(offset, READ_LENGTH)
            except NbdFailed as error:
                self.errors.append(f"{offset}: {error}")
                continue
            self.waits.append(wait)
            if data != self.expected[offset : offset + READ_LENGTH]:
                self.wrong += 1


# -- the fake server (run as a child: ``--fake stuck|drip``) ----------------------------------


async def fake_server(behaviour: str, listen: str, store: Path, site: list[str]) -> None:
    """Serve vDisk ``bench`` of ``store`` (its real manifest) as ``behaviour`` says, until
    SIGTERM."""
    from pvs_protocol import events as ev
    from pvs_protocol.connection import Connection, Role, negotiate
    from pvs_protocol.errors import ProtocolError
    from pvs_protocol.manifest import Manifest
    from pvs_protocol.modes import Mode

    image = (store / "bench.img").read_bytes()
    manifest = Manifest.decode((store / "bench.manifest").read_bytes())
    name = f"fake-{behaviour}"

    def answer(event: ev.Event) -> ev.Event | None:
        match event:
            case ev.Hello():
                return negotiate(event, max_request=MIB, max_in_flight=16, server_name=name)
            case ev.Login():
                return ev.LoginOk(
                    1, manifest.identity, manifest.block_size, Mode.standard.code,
                    ev.LoginFlag.READ_ONLY | ev.LoginFlag.FAILOVER, name, listen, tuple(site),
                )
            case ev.Keepalive(token, reply=False):
                return ev.Keepalive(token, reply=True)
            case ev.Read() | ev.Digests() if behaviour == "stuck":
                return None
            case ev.Read(request_id, offset, length):
                return ev.ReadData(request_id, image[offset : offset + length])
            case ev.Digests(request_id, level, page, _length):
                return ev.ReadData(request_id, manifest.page(level, page))
        return None

    async def send(writer: asyncio.StreamWriter, queue: asyncio.Queue[tuple[bytes, bool]]) -> None:
        while True:
            frame, is_data = await queue.get()
            if behaviour != "drip" or not is_data:
                writer.write(frame)
                continue
            for index in range(len(frame)):  # ends when the connection's task cancels it
                writer.write(frame[index : index + 1])
                await asyncio.sleep(DRIP_INTERVAL)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(Role.SERVER)
        queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        sender = asyncio.create_task(send(writer, queue))
        try:
            while data := await reader.read(1 << 16):
                connection.receive_data(data)
                while not isinstance(event := connection.next_event(), ev.NeedData):
                    reply = answer(event)
                    if reply is not None:
                        frame = b"".join(bytes(b) for b in connection.send_buffers(reply))
                        queue.put_nowait((frame, isinstance(reply, ev.ReadData)))
        except (ConnectionError, ProtocolError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            writer.close()

    host, port = listen.rsplit(":", 1)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(serve, host, int(port))
    print(json.dumps({"event": "listening", "address": listen}), flush=True)
    async with server:
        await stop.wait()


# -- a store that can be made to hang ---------------------------------------------------------


class Skipped(Exception):
    """A fault this machine cannot produce; the message says why."""


@dataclass
class StallableStore:
    directory: Path
    pause: Callable[[], None]
    resume: Callable[[], None]


def _command(control: Path, byte: bytes, answer: bytes) -> None:
    """One command to nbdkit's pause filter (p: pause, r: resume), answered when done."""
    with socket.socket(socket.AF_UNIX) as channel:
        channel.settimeout(30)
        channel.connect(str(control))
        channel.sendall(byte)
        if channel.recv(1) != answer:
            raise RuntimeError(f"nbdkit pause control did not answer {answer!r}")


def _unmount(path: Path) -> None:
    for _ in range(50):  # bounded: busy for a moment while a process lets go
        with contextlib.suppress(RuntimeError):
            _run(["umount", str(path)], 30)
        if not os.path.ismount(path):
            return
        time.sleep(0.1)
    with contextlib.suppress(RuntimeError):
        _run(["umount", "-l", str(path)], 30)


@contextlib.contextmanager
def stallable_store(work: Path, registry: Children) -> Iterator[StallableStore]:
    """ext4 on a loop device over nbdfuse over ``nbdkit --filter=pause file``: pausing nbdkit
    hangs the file system's I/O. Everything is resumed, unmounted and detached on the way out."""
    if os.geteuid() != 0 or not Path("/dev/loop-control").exists():
        raise Skipped("needs root and loop devices")
    missing = [t for t in ("nbdkit", "nbdfuse", "losetup", "mkfs.ext4") if not shutil.which(t)]
    if missing:
        raise Skipped(f"not installed: {', '.join(missing)}")
    backing = work / "stall.raw"
    with backing.open("wb") as handle:
        handle.truncate(512 * MIB)
    _run(["mkfs.ext4", "-q", "-F", str(backing)], 60)
    socket_path, control = work / "stall-nbd.sock", work / "stall-pause.sock"
    fuse_dir, mountpoint = work / "stall-fuse", work / "stall-mnt"
    fuse_dir.mkdir()
    mountpoint.mkdir()
    loop_device = ""
    nbdkit = registry.start("stall-nbdkit", [
        "nbdkit", "-f", "-U", str(socket_path), "--filter=pause", "file", str(backing),
        f"pause-control={control}",
    ])
    nbdfuse: Child | None = None
    try:
        until("nbdkit to listen", lambda: socket_path.exists() and control.exists(), 30)
        nbdfuse = registry.start("stall-nbdfuse", [
            "nbdfuse", str(fuse_dir / "disk"), "--unix", str(socket_path),
        ])
        until("nbdfuse to mount", (fuse_dir / "disk").exists, 30)
        loop_device = _run(["losetup", "-f", "--show", "--direct-io=on",
                            str(fuse_dir / "disk")], 30).stdout.strip()
        _run(["mount", loop_device, str(mountpoint)], 30)
        yield StallableStore(
            mountpoint, lambda: _command(control, b"p", b"P"),
            lambda: _command(control, b"r", b"R"),
        )
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            _command(control, b"r", b"R")
        if os.path.ismount(mountpoint):
            _unmount(mountpoint)
        if loop_device:
            with contextlib.suppress(RuntimeError):
                _run(["losetup", "-d", loop_device], 30)
        if os.path.ismount(fuse_dir):
            _unmount(fuse_dir)
        if nbdfuse is not None:
            registry.stop(nbdfuse)
        registry.stop(nbdkit)


def copy_store(source: Path, directory: Path) -> Path:
    """A store holding a copy of ``source``'s vDisk files (a hard link cannot cross file
    systems); same bytes, same manifest: an identical replica."""
    directory.mkdir(parents=True)
    for file in source.glob("bench.*"):
        if not file.name.endswith((".identity.json", ".lock")):
            shutil.copy2(file, directory / file.name)
    return directory


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache, so that reading it needs the (paused) disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


# -- one fault --------------------------------------------------------------------------------


@dataclass
class Outcome:
    fault: str
    longest_seen_ms: float = 0.0
    reported_ms: float | None = None
    took_ms: float | None = None
    detected_after_ms: float | None = None
    in_flight: int | None = None
    reason: str = ""
    reads: int = 0
    errors: int = 0
    wrong: int = 0
    note: str = ""


async def status_of(control: Path) -> dict[str, Any]:
    from pvs_target.control import query

    return await query(str(control))


async def until_async(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:g} s")
        await asyncio.sleep(0.05)


async def measure(
    fault: str, registry: Children, work: Path, stores: list[Path], expected: bytes,
    depth: int, stallable: StallableStore | None = None,
) -> Outcome:
    """One fault, on a site of its own; with ``stallable``, ``stores[0]`` is on it. Ties of
    load go to the login server, and the target logs in at s1 first: s1 is its server."""
    site = Site(registry, work, stores, (1.0, 1.0, 1.0), HOSTS, label=fault.replace(" ", "-"))
    site.start(timeout=120)
    servers = list(site.addresses.values())
    fake: Child | None = None
    if fault in ("stuck", "drip"):
        address = f"{FAKE_HOST}:{free_port(FAKE_HOST, span=1)}"
        fake = registry.start(f"fake-{fault}", [
            sys.executable, str(HERE / "faults.py"), "--fake", fault, "--listen", address,
            "--store", str(stores[0]), *[arg for s in servers for arg in ("--site", s)],
        ])
        fake.wait_for_log("listening", 30)
        servers = [address, *servers]
    nbd_socket, control = work / "nbd.sock", work / "control.sock"
    target = start_attach(registry, f"{fault.replace(' ', '-')}-target", servers, nbd_socket,
                          control, "bench-faults")
    client = await NbdClient.connect(nbd_socket)
    load = Load(client, expected, depth)
    reading = asyncio.create_task(load.run())
    outcome = Outcome(fault)
    stopping: asyncio.Task[str] | None = None
    try:
        before = 0
        if fake is None:  # a real fault on a healthy stream: read a while first
            await asyncio.sleep(LEAD)
            status = await status_of(control)
            before = len(status["failovers"])
            victim = status["server"]["name"]
            child = site.servers[victim]
            if fault == "stalled store":
                if stallable is None or victim != "s1":
                    raise RuntimeError(f"the target streams from {victim}, not the stallable s1")
                evict(stores[0] / "bench.img")
                stallable.pause()
            elif fault == "SIGSTOP":
                os.kill(child.pid, signal.SIGSTOP)  # our own child; Child.stop sends SIGCONT
            elif fault == "SIGKILL":
                child.kill()
            else:
                via = next(name for name in site.names if name != victim)
                # pvsctl waits for the drain: in a thread, so the reader keeps measuring
                stopping = asyncio.create_task(
                    asyncio.to_thread(site.pvsctl, "stop-stream", victim, via=via)
                )

        async def moved() -> bool:
            status = await status_of(control)
            return len(status["failovers"]) > before and status["state"] == "streaming"

        await until_async(f"a failover after {fault}", moved, 30)
        await asyncio.sleep(AFTER)
        if stopping is not None:  # pvsctl returns once the drain is over (bounded by it)
            async with asyncio.timeout(120):
                await stopping
    finally:
        if stallable is not None:
            await asyncio.to_thread(stallable.resume)  # a hung pvsd cannot even be killed
        load.stopped.set()
        async with asyncio.timeout(30):
            await reading
        await client.close()
    status = await status_of(control)
    record = status["failovers"][before]
    outcome.longest_seen_ms = max(load.waits, default=0.0) * 1000
    outcome.reported_ms = record["longest_wait_ms"]
    outcome.took_ms = record["took_ms"]
    outcome.detected_after_ms = record["detected_after_ms"]
    outcome.in_flight = record["in_flight"]
    outcome.reason = record["reason"]
    outcome.reads, outcome.errors, outcome.wrong = len(load.waits), len(load.errors), load.wrong
    registry.stop(target)
    if fake is not None:
        registry.stop(fake)
    site.stop()
    return outcome


# -- main -------------------------------------------------------------------------------------


def make_stores(work: Path, image: Path, count: int) -> list[list[Path]]:
    """``count`` sites' worth of stores (three each), every one a hard link of ``image``
    with a copy of its manifest, all made before any pvsd starts (see ``link_store``)."""
    manifest = image.with_name("bench.manifest")
    sites = []
    for index in range(count):
        stores = []
        for server in range(1, 4):
            store = link_store(image, work / f"site{index}" / f"store{server}")
            shutil.copy2(manifest, store / manifest.name)
            stores.append(store)
        sites.append(stores)
    return sites


def print_table(outcomes: list[Outcome]) -> None:
    headers = ["fault", "reader longest ms", "status longest ms", "took ms", "detected ms",
               "in flight", "reads", "errors", "target", "reason / note"]
    rows = []
    for outcome in outcomes:
        if outcome.note:
            rows.append([outcome.fault, *["-"] * 8, outcome.note])
            continue
        limit = TARGET_MS.get(outcome.fault, 2000.0)
        met = "met" if outcome.longest_seen_ms <= limit else f"MISSED (<= {limit:g})"
        rows.append([
            outcome.fault, f"{outcome.longest_seen_ms:.1f}", f"{outcome.reported_ms:.1f}",
            f"{outcome.took_ms:.1f}", f"{outcome.detected_after_ms:.1f}", str(outcome.in_flight),
            str(outcome.reads), str(outcome.errors + outcome.wrong), met, outcome.reason,
        ])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


async def run_faults(args: argparse.Namespace) -> list[Outcome]:
    outcomes: list[Outcome] = []
    environment = python_environment(None)
    with tempfile.TemporaryDirectory(prefix="pvs-faults-", dir=args.workdir) as temporary:
        work = Path(temporary)
        image = make_store(work, args.size, environment)
        expected = image.read_bytes()
        chosen = [fault for fault in FAULTS if fault in args.faults]
        stores = make_stores(work, image, len(chosen))
        (work / "logs").mkdir()
        for fault, site_stores in zip(chosen, stores, strict=True):
            print(f"fault {fault} ...", file=sys.stderr, flush=True)
            with children(work / "logs", environment) as registry:
                fault_work = work / fault.replace(" ", "-")
                fault_work.mkdir()
                async with asyncio.timeout(300):
                    if fault != "stalled store":
                        outcomes.append(await measure(
                            fault, registry, fault_work, site_stores, expected, args.depth
                        ))
                        continue
                    try:
                        with stallable_store(fault_work, registry) as stallable:
                            own = copy_store(site_stores[0], stallable.directory / "store")
                            outcomes.append(await measure(
                                fault, registry, fault_work, [own, *site_stores[1:]],
                                expected, args.depth, stallable,
                            ))
                    except Skipped as reason:
                        outcomes.append(Outcome(fault, note=f"skipped: {reason}"))
        if args.keep_logs:
            shutil.copytree(work / "logs", args.keep_logs, dirs_exist_ok=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=64 * MIB, help="image size (64M)")
    parser.add_argument("--depth", type=int, default=4, help="reads in flight (4)")
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS,
                        metavar="FAULT", help=f"which of: {', '.join(FAULTS)}")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy every log here")
    parser.add_argument("--fake", choices=("stuck", "drip"), help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--site", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fake:
        asyncio.run(fake_server(args.fake, args.listen, args.store, args.site))
        return 0
    if not 1 <= args.depth <= 64 or not MIB <= args.size <= 4096 * MIB:
        parser.error("--depth must be 1..64 and --size 1M..4G")
    started = datetime.datetime.now(datetime.UTC)
    load_before = load_line()
    outcomes = asyncio.run(run_faults(args))
    print(f"pvs faults, {started.isoformat(timespec='seconds')}, commit {revision(HERE.parent)}")
    info = machine()
    print(f"machine: {info.get('cpu', '?')}, {info['cpus']} CPUs, kernel {info['kernel']}, "
          f"Python {info['python']}, host {socket.gethostname()}")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_line()}")
    print(f"settings: pvs-target attach defaults (dead-after 1.5 s, request deadline = "
          f"dead-after); {args.depth} reads of {READ_LENGTH // 1024} KiB in flight, "
          f"{args.size // MIB} MiB image")
    print_table(outcomes)
    print("reader longest: the longest read wait the outside NBD reader measured; status "
          "longest: the failover record's longest_wait_ms; target: issue 11's bound "
          "(stop-stream <= 100 ms, others <= 2 s) on the reader's figure")
    if args.json:
        args.json.write_text(json.dumps([vars(o) for o in outcomes], indent=2) + "\n")
    return 1 if any(o.errors or o.wrong for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
