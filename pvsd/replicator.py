"""Copies of vDisk versions pulled from another server: the receiving side's runtime.

A copy is asked for with `Replicator.replicate` (the admin API's ``POST /v1/local/
replications``). It runs as a task of the replicator's task group, itself a task of pvsd's
main task group, and goes through these steps (`transfer.Step`):

1. find a source: a serving server whose copy has exactly the identity asked for (the one
   named, else any other, so a copy resumed after a restart does not depend on one server);
2. fetch the manifest over the admin API in bounded ranges and check it completely
   (`Manifest.decode`); its identity must be the one asked for;
3. write a small record beside the partial image (``.NAME@N.replication.json``), then open
   or create the partial image (``.NAME@N.partial``, sparse): names the store scanner ignores;
4. if the partial image was there already (pvsd was killed, or a copy failed), read it and
   compare every block with the manifest: only blocks that do not match are fetched (a
   journal of "done" blocks could lie after a crash; the bytes cannot);
5. fetch the missing blocks in bounded ranges, a few requests in flight, paced by a token
   bucket; every block is checked against its leaf digest before it is written; a bad block is
   fetched once more, and a second bad answer fails the copy naming the source as suspect;
   blocks the manifest says are zeros are never fetched (the copy stays sparse);
6. fetch the version's boot files the source has (kernel, initramfs, arguments: `pvsd.boot`)
   whole, each under a temporary name (``.NAME@N.vmlinuz.partial``), checked against the
   size and SHA-256 the source gave (they are not in the manifest);
7. fsync, set the version's state in the properties file to the source's (or write the
   source's properties file when there is none), write ``NAME@N.manifest``, rename the boot
   files into place, link the image into place as ``NAME@N.img``, record it as verified with
   its final stat key (so the catalog does not read it again) and remove the record.

Killing pvsd leaves the record and the partial image: at the next start the copy resumes by
itself (step 1). A failed copy keeps its partial image and a record saying why: it is shown,
and not resumed at start; replicating again resumes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol import manifest as mf
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity
from pvs_protocol.modes import VersionState
from pvsd import admin_auth, boot
from pvsd import transfer as tr
from pvsd.config import Config
from pvsd.identity import StatKey, Verified, write_verified
from pvsd.manifest import write_manifest
from pvsd.names import InvalidName, validate_name
from pvsd.properties import (
    PropertiesError,
    load_properties,
    properties_path,
    set_version_state,
    write_atomically,
)
from pvsd.server import StreamServer
from pvsd.store import ImageFile, Store, VDisk
from pvsd.tls import PeerTransport, TlsError
from pvsd.versions import image_file

log = structlog.get_logger("pvsd.replicator")
_T = TypeVar("_T")

PROGRESS_INTERVAL = 2.0
"""Seconds between ``replication_progress`` log lines of one copy."""
IN_FLIGHT = 3
"""Requests a copy has outstanding at once: enough to hide a round trip behind the checking
and writing of the previous answer, few enough to stay a background job."""
REQUEST_TIMEOUT = 30.0
RETRIES = 3
"""A request that fails (connection lost, timeout) is sent again this often, 1, 2, 4 s apart."""
SOURCE_WAIT = 60.0
"""How long a copy resumed at start waits to hear of a server holding its identity."""
HASH_CHUNK = 8 * 1024 * 1024
PUBLISH_WAIT = 30.0
"""How long a finished copy waits for the catalog to serve it before it says done anyway."""
MAX_ANSWER = tr.MAX_REQUEST + 65536
"""The largest answer read from a source: a range of bytes, or a page of JSON."""
KEEP_FINISHED = 64
"""Finished copies (done or failed) kept for the API, newest first."""
MAX_BOOT_FILE = 1 << 30
"""A boot file larger than this (a kernel is some 10 MiB, an initramfs some 100) is not
copied: the copy fails naming it."""


class ReplicationRefused(Exception):
    """A copy that cannot be started; ``message`` says what to do instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CopyFailed(Exception):
    """A copy that had to stop; the message names the cause and what to do."""


@dataclasses.dataclass(eq=False)
class Job:
    """One copy of one version, running or finished."""

    record: tr.ResumeRecord
    store: Store
    meter: tr.Meter
    bucket: tr.TokenBucket
    state: tr.State = tr.State.COPYING
    step: tr.Step = tr.Step.WAITING
    source: str = ""
    error: str = ""
    resumed: bool = False
    started: float = dataclasses.field(default_factory=time.time)
    finished: float = 0.0
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.record.vdisk, self.record.version

    @property
    def image(self) -> Path:
        return self.store.path / image_file(self.record.vdisk, self.record.version)

    @property
    def partial(self) -> Path:
        return self.store.path / tr.partial_name(self.image.name)

    @property
    def record_path(self) -> Path:
        return self.store.path / tr.record_name(self.image.name)

    def to_json(self, server: str, now: float) -> dict[str, Any]:
        return {
            "server": server, "vdisk": self.record.vdisk, "version": self.record.version,
            "identity": self.record.identity.to_json(), "short": self.record.identity.short,
            "source": self.source or self.record.source, "state": str(self.state),
            "step": str(self.step) if self.state is tr.State.COPYING else None,
            "error": self.error or None, "resumed": self.resumed,
            "rate_limit": self.bucket.rate, "store": str(self.store.path),
            "started": _iso(self.started), "finished": _iso(self.finished) or None,
            **self.meter.to_json(now),
        }


class Replicator:
    """This server's copies from other servers, and the reads its own copies serve to them.

    `run` must be running (a task of pvsd's main task group) for copies to start; cancelling
    it stops every copy where it stands, to be resumed at the next start.
    """

    def __init__(self, config: Config, server: StreamServer) -> None:
        self.config = config
        self.server = server
        self.jobs: dict[tuple[str, int], Job] = {}
        self.finished: list[Job] = []
        self.executor = ThreadPoolExecutor(2, thread_name_prefix="pvsd-repl")
        """Blocking file work of copies and of the reads served to other servers: a pool of
        its own, apart from serving I/O and from the catalog's hashing."""
        self._group: asyncio.TaskGroup | None = None
        self._client: aiohttp.ClientSession | None = None
        self._peers = PeerTransport()

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Resume the copies a previous run left, then serve requests until cancelled."""
        try:
            try:
                self._peers = PeerTransport.for_config(self.config)
            except TlsError as error:
                raise OSError(f"replication over the admin API: {error}") from None
            async with aiohttp.ClientSession() as client, asyncio.TaskGroup() as group:
                self._client, self._group = client, group
                try:
                    self._resume_left_over()
                    await asyncio.Event().wait()
                finally:
                    self._group = None
        finally:
            self._client = None
            self.executor.shutdown(wait=False, cancel_futures=True)

    def _resume_left_over(self) -> None:
        for store in self.server.catalog.stores:
            try:
                paths = sorted(store.path.glob(".*" + tr.RECORD_SUFFIX))
            except OSError:
                continue  # the catalog says what is wrong with the store
            for path in paths:
                try:
                    record = tr.ResumeRecord.decode(path.read_text(encoding="utf-8"))
                    validate_name(record.vdisk)
                except (OSError, ValueError, InvalidName) as error:
                    log.warning(
                        "replication_record_unreadable", path=str(path), error=str(error),
                        action="remove it and its .partial image; replicate again if needed",
                    )
                    continue
                if path.name != tr.record_name(image_file(record.vdisk, record.version)):
                    log.warning("replication_record_misnamed", path=str(path),
                                action="remove it; replicate again if needed")
                    continue
                job = self._new_job(record, store, resumed=True)
                if record.error:
                    job.state, job.error, job.finished = tr.State.FAILED, record.error, time.time()
                    self.finished.insert(0, job)
                    continue
                log.info("replication_resuming", vdisk=record.vdisk, version=record.version,
                         identity=record.identity.short, store=str(store.path))
                self._start(job)

    # -- what the admin API asks ------------------------------------------------------------

    def replicate(
        self, vdisk: str, identity: ReplicaIdentity, source: str, rate: float | None
    ) -> dict[str, Any]:
        """Start (or resume) a copy of ``identity`` from ``source``; or say that we hold it
        already, or that it is being copied. ReplicationRefused if it cannot be."""
        validate_name(vdisk)
        name, version = vdisk, identity.version
        if self._group is None:
            raise ReplicationRefused(503, f"{self.config.name} is starting or stopping: run the "
                                          "command again in a moment")
        running = self.jobs.get((name, version))
        if running is not None:
            if running.record.identity != identity:
                raise ReplicationRefused(409, f"{self.config.name} is copying another "
                                         f"{name} version {version} "
                                         f"({running.record.identity.short}) now; wait for it")
            if rate is not None:
                running.bucket.set_rate(rate, time.monotonic())
            return self._answer(running, "already copying")
        existing = self.server.catalog.replica(name, version)
        note = "copying"
        if existing is None:
            store = self._store_for(name, version)
            self._check_space(store, name, identity)
        else:
            known = existing.manifest.identity if existing.manifest is not None else None
            if existing.identity == identity and existing.damage is None:
                return {"server": self.config.name, "ok": True, "state": "identical",
                        "vdisk": name, "version": version}
            if existing.damage is not None and known == identity:
                store = self._repair(existing)
                note = "repairing its damaged copy"
            elif existing.identity is None and existing.damage is None:
                raise ReplicationRefused(409, f"{self.config.name} is checking its copy of "
                                         f"{name} version {version} now: run the command again "
                                         "once it is done (pvsctl vdisks)")
            elif existing.damage is not None:
                raise ReplicationRefused(
                    409, f"{self.config.name}'s copy {existing.path} of {name} version "
                    f"{version} is damaged and does not carry the manifest asked for: remove "
                    "the image and its manifest there, then run the command again",
                )
            else:
                short = known.short if known is not None else "another manifest"
                raise ReplicationRefused(
                    409, f"{self.config.name} holds another copy of {name} version {version} "
                    f"({short}, not {identity.short}) in {existing.path}: a version is made "
                    "once; remove that image and its manifest there first if it is not wanted",
                )
        record = tr.ResumeRecord(name, version, identity, source, rate, time.time_ns())
        job = self._new_job(record, store, resumed=False)
        if note == "copying" and job.partial.exists():
            note = "resuming a partial copy"
        self.finished = [j for j in self.finished if j.key != job.key]
        self._start(job)
        log.info("replication_accepted", vdisk=name, version=version, identity=identity.short,
                 source=source, store=str(store.path), rate=job.bucket.rate, note=note)
        return self._answer(job, note)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        jobs = [*self.jobs.values(), *self.finished]
        return [job.to_json(self.config.name, now) for job in jobs]

    async def blocking(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking file work in the replicator's pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def _answer(self, job: Job, what: str) -> dict[str, Any]:
        return {"ok": True, **job.to_json(self.config.name, time.monotonic()), "note": what}

    def _new_job(self, record: tr.ResumeRecord, store: Store, *, resumed: bool) -> Job:
        now = time.monotonic()
        rate = record.rate if record.rate is not None else self.config.replication_rate
        return Job(record, store, tr.Meter(record.identity.size, now), tr.TokenBucket(rate, now),
                   source=record.source, resumed=resumed)

    def _start(self, job: Job) -> None:
        assert self._group is not None
        self.jobs[job.key] = job
        job.task = self._group.create_task(
            self._copy(job), name=f"replicate {job.record.vdisk} v{job.record.version}"
        )

    def _store_for(self, name: str, version: int) -> Store:
        """Where a new copy goes: the store where it was begun before, else one holding other
        versions of the vDisk (its properties file is there), else the first store; stores of
        this server's own before shared ones."""
        stores = sorted(self.server.catalog.stores, key=lambda s: s.shared)
        record = tr.record_name(image_file(name, version))
        for store in stores:
            if (store.path / record).exists():
                return store
        for vdisk in self.server.catalog.versions(name).values():
            if not vdisk.store.shared:
                return vdisk.store
        for store in stores:
            if properties_path(store.path / f"{name}.img").exists():
                return store
        if not stores:
            raise ReplicationRefused(409, f"{self.config.name} has no store to copy into; "
                                          "give it one with --store DIR")
        return stores[0]

    def _repair(self, damaged: VDisk) -> Store:
        """A damaged copy of the very version asked for: its image becomes the partial copy,
        so only its bad blocks are fetched. It is not served anyway."""
        partial = damaged.store.path / tr.partial_name(damaged.path.name)
        if damaged.path.name != image_file(damaged.name, damaged.version):
            raise ReplicationRefused(
                409, f"{self.config.name}'s copy {damaged.path} is damaged: remove it (and its "
                "manifest) and run the command again",
            )
        try:
            os.replace(damaged.path, partial)
        except OSError as error:
            raise ReplicationRefused(409, f"cannot move the damaged {damaged.path} aside on "
                                          f"{self.config.name}: {error.strerror}; make the "
                                          "store writable") from None
        log.warning("replication_repairs", vdisk=damaged.name, version=damaged.version,
                    path=str(damaged.path), hint="its damaged blocks are fetched again")
        return damaged.store

    def _check_space(self, store: Store, name: str, identity: ReplicaIdentity) -> None:
        """Refuse a copy that cannot fit (counting what a partial copy holds already)."""
        partial = store.path / tr.partial_name(image_file(name, identity.version))
        try:
            stats = os.statvfs(store.path)
            held = partial.stat().st_blocks * 512 if partial.exists() else 0
        except OSError as error:
            raise ReplicationRefused(409, f"store {store.path} on {self.config.name}: "
                                          f"{error.strerror}; check the directory") from None
        free = stats.f_bavail * stats.f_frsize
        if free + held < identity.size:
            raise ReplicationRefused(
                507, f"store {store.path} on {self.config.name} has {free} bytes free, the "
                f"copy needs up to {identity.size}; free space there first",
            )

    # -- one copy ---------------------------------------------------------------------------

    async def _copy(self, job: Job) -> None:
        record = job.record
        bound = log.bind(vdisk=record.vdisk, version=record.version,
                         identity=record.identity.short, store=str(job.store.path))
        try:
            await self._copy_steps(job, bound)
        except asyncio.CancelledError:
            bound.info("replication_interrupted", percent=job.meter.percent,
                       hint="pvsd is stopping: the copy resumes when it starts again")
            raise
        except (CopyFailed, OSError, PropertiesError) as error:
            message = str(error) if isinstance(error, CopyFailed) else (
                f"cannot write the copy into {job.store.path} on {self.config.name}: {error}"
            )
            self._failed(job, message, bound)
        except Exception as error:
            bound.exception("replication_internal_error")
            self._failed(job, f"internal error in pvsd ({type(error).__name__}); the log of "
                         f"{self.config.name} has the details", bound)
        finally:
            if self.jobs.get(job.key) is job and job.state is not tr.State.COPYING:
                del self.jobs[job.key]
                self.finished.insert(0, job)
                del self.finished[KEEP_FINISHED:]

    def _failed(self, job: Job, message: str, bound: FilteringBoundLogger) -> None:
        job.state, job.error, job.finished = tr.State.FAILED, message, time.time()
        bound.error(
            "replication_failed", error=message, source=job.source, percent=job.meter.percent,
            action="fix the cause and run 'pvsctl vdisk replicate' again: the copy resumes from "
            "the blocks it has",
        )
        try:
            if job.record_path.exists():
                failed = dataclasses.replace(job.record, error=message)
                write_atomically(job.record_path, failed.encode())
        except OSError:
            pass  # the record without the error resumes at the next start: no harm

    async def _copy_steps(self, job: Job, bound: FilteringBoundLogger) -> None:
        record = job.record
        if job.resumed and job.image.exists() and not job.partial.exists():
            # killed after the image was put in place, before its record was removed
            job.record_path.unlink(missing_ok=True)
            job.state, job.finished = tr.State.DONE, time.time()
            bound.info("replication_done", path=str(job.image), bytes_transferred=0,
                       hint="it was in place already when pvsd started")
            return
        job.step = tr.Step.WAITING
        source, address = await self._find_source(job)
        job.source = source
        job.step = tr.Step.MANIFEST
        base = f"/v1/local/replicas/{record.vdisk}/{record.version}"
        query = f"digest={record.identity.digest.hex()}"
        try:
            info = json.loads(await self._get(source, address, f"{base}?{query}"))
            identity = ReplicaIdentity.from_json(info["identity"])
        except (ValueError, TypeError, KeyError):
            raise CopyFailed(f"{source} described its copy in a way this pvsd does not "
                             "understand; run the same pvs version on every server") from None
        if identity != record.identity:
            raise CopyFailed(f"{source} holds {identity.short} now, not {record.identity.short}: "
                             "its copy changed meanwhile; replicate again")
        manifest = await self._fetch_manifest(source, address, base, query, info)
        if manifest.identity != record.identity:
            raise CopyFailed(f"{source} sent the manifest of {manifest.identity.short}, not "
                             f"{record.identity.short}; replicate again")
        # the record first: a partial image is never left without one
        write_atomically(job.record_path, dataclasses.replace(record, source=source).encode())
        # Closed once nobody holds it, never explicitly: a cancelled copy's last write may
        # still run in a worker thread, and its descriptor must not be reused meanwhile.
        partial = ImageFile(
            os.open(job.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        )
        plan = await self._plan(job, partial, manifest, bound)
        job.step = tr.Step.FETCHING
        await self._fetch_blocks(job, partial, manifest, plan, source, address, base, query,
                                 bound)
        job.step = tr.Step.FINISHING
        await self.blocking(_fsync, partial)
        del partial
        boot_files = await self._fetch_boot_files(job, source, address, base, query, info, bound)
        await self._finish(job, manifest, info, bound, boot_files)

    async def _find_source(self, job: Job) -> tuple[str, str]:
        """A serving server holding exactly the identity: the one named, else another."""
        identity, deadline = job.record.identity, time.monotonic() + SOURCE_WAIT
        while True:
            site = self.server.site
            view = site.view() if site is not None else []
            holders = sorted(
                (s for s in view if s.serving and s.name != self.config.name
                 and s.holds(job.record.vdisk, identity)),
                key=lambda s: (s.name != job.record.source, s.load, s.name),
            )
            names = [holder.name for holder in holders]
            if not job.resumed:
                # asked now by a server that saw the source hold it: our view may lag by a
                # datagram, and the source checks the identity itself
                names.append(job.record.source)
            for name in names:
                peer = site.peers.get(name) if site is not None else None
                address = peer.admin_address if peer is not None and peer.up else None
                if address:
                    return name, address
            if not job.resumed or time.monotonic() > deadline:
                raise CopyFailed(
                    f"no serving server holds {job.record.vdisk} {identity.short} now (asked "
                    f"for {job.record.source}); start one that does, then replicate again"
                )
            await asyncio.sleep(0.2)

    async def _fetch_manifest(
        self, source: str, address: str, base: str, query: str, info: dict[str, Any]
    ) -> mf.Manifest:
        size = info.get("manifest_bytes")
        if not isinstance(size, int) or size < mf.HEADER_SIZE or size > (1 << 34):
            raise CopyFailed(f"{source} gave no usable manifest size; is it the same pvs?")
        parts = []
        for offset in range(0, size, tr.MAX_REQUEST):
            length = min(tr.MAX_REQUEST, size - offset)
            parts.append(await self._get(
                source, address, f"{base}/manifest?{query}&offset={offset}&length={length}",
            ))
        data = b"".join(parts)
        try:
            manifest = await self.blocking(mf.Manifest.decode, data)
        except mf.ManifestError as error:
            raise CopyFailed(f"the manifest {source} sent is not valid ({error}): its copy may be "
                             "damaged; replicate from another server (pvsctl vdisks)") from None
        return manifest

    async def _plan(
        self, job: Job, partial: ImageFile, manifest: mf.Manifest, bound: FilteringBoundLogger
    ) -> tr.BlockPlan:
        size = os.fstat(partial.fd).st_size
        leaves: bytes | None = None
        if size:
            job.step = tr.Step.CHECKING
            if size != manifest.size:
                await self.blocking(_truncate, partial, manifest.size)
            leaves = await self._check_partial(partial, manifest, bound)
        else:
            await self.blocking(_truncate, partial, manifest.size)
        plan = tr.plan_blocks(manifest, leaves)
        job.meter.start(plan, time.monotonic())
        bound.info(
            "replication_started" if leaves is None else "replication_resumed",
            source=job.source, bytes_total=manifest.size, bytes_good=plan.good_bytes,
            bytes_to_fetch=plan.fetch_bytes, rate_limit=tr.format_rate(job.bucket.rate),
        )
        return plan

    async def _check_partial(
        self, partial: ImageFile, manifest: mf.Manifest, bound: FilteringBoundLogger
    ) -> bytes:
        """The leaf digests of what the partial image holds, logging progress meanwhile."""
        checked = [0]
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, _hash_file, partial, manifest.shape, checked
        )
        try:
            while not future.done():
                await asyncio.wait([future], timeout=PROGRESS_INTERVAL)
                if not future.done():
                    bound.info("replication_checking", bytes_checked=checked[0],
                               bytes_total=manifest.size,
                               percent=round(100 * checked[0] / max(manifest.size, 1), 1))
            return future.result()
        finally:
            future.cancel()  # only marks it: the thread ends its chunk, holding the file

    async def _fetch_blocks(
        self, job: Job, partial: ImageFile, manifest: mf.Manifest, plan: tr.BlockPlan,
        source: str,
        address: str, base: str, query: str, bound: FilteringBoundLogger,
    ) -> None:
        shape = manifest.shape
        pieces = tr.requests(plan, tr.request_bytes(job.bucket.rate, shape.block_size))
        last_log = time.monotonic()

        async def worker() -> None:
            nonlocal last_log
            for run in pieces:  # one iterator shared by the workers
                offset, length = tr.range_bytes(shape, run)
                if run.kind is tr.Kind.ZERO:
                    await self.blocking(_write, partial, bytes(length), offset)
                    job.meter.zeroed(length)
                    continue
                await asyncio.sleep(job.bucket.reserve(length, time.monotonic()))
                path = f"{base}/blocks?{query}&offset={offset}&length={length}"
                received = 0
                for attempt in (1, 2):
                    data = await self._get(source, address, path)
                    received += len(data)
                    bad = await self.blocking(_check_and_write, partial, manifest, run, data)
                    if not bad:
                        break
                    bound.warning(
                        "replication_bad_block", source=source, block=bad[0], bad_blocks=len(bad),
                        attempt=attempt, hint="fetched once more" if attempt == 1 else
                        "the source's copy may be damaged",
                    )
                else:
                    await self._report_bad(source, address, base, bad[0])
                    raise CopyFailed(
                        f"{source} sent block {bad[0]} (offset {bad[0] * shape.block_size}) of "
                        f"{job.record.vdisk} version {job.record.version} twice with content "
                        f"that does not match the manifest: {source}'s copy is suspect; check it "
                        f"(pvsctl vdisk verify there, pvsctl vdisks) and replicate from another "
                        "server with an identical copy"
                    )
                now = time.monotonic()
                job.meter.fetched(received, length, now)
                if now - last_log >= PROGRESS_INTERVAL:
                    last_log = now
                    bound.info("replication_progress", source=source, **job.meter.to_json(now))

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(IN_FLIGHT):
                    group.create_task(worker())
        except BaseExceptionGroup as group:  # the first failure stopped the other workers
            raise _first(group) from None

    async def _fetch_boot_files(
        self, job: Job, source: str, address: str, base: str, query: str, info: dict[str, Any],
        bound: FilteringBoundLogger,
    ) -> list[tuple[Path, Path]]:
        """The source's boot files of the version, each whole under a temporary name beside
        the partial image: (temporary, final) pairs, renamed by `_finish`. Small next to an
        image, so fetched again whole when a copy resumes."""
        offered = info.get("boot_files") or {}
        if not isinstance(offered, dict):
            raise CopyFailed(f"{source} described the version's boot files in a way this pvsd "
                             "does not understand; run the same pvs version on every server")
        fetched: list[tuple[Path, Path]] = []
        try:
            for kind in boot.BootFile:
                about = offered.get(str(kind))
                if about is None:
                    continue
                size, digest = _boot_file_info(source, kind, about)
                final = job.store.path / boot.file_name(boot.stem_of(job.image.name), kind)
                temporary = job.store.path / f".{final.name}{tr.PARTIAL_SUFFIX}"
                fetched.append((temporary, final))
                data = hashlib.sha256()
                handle = ImageFile(os.open(
                    temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o644,
                ))
                for offset in range(0, size, tr.MAX_REQUEST):
                    length = min(tr.MAX_REQUEST, size - offset)
                    await asyncio.sleep(job.bucket.reserve(length, time.monotonic()))
                    piece = await self._get(
                        source, address,
                        f"{base}/boot/{kind}?{query}&offset={offset}&length={length}",
                    )
                    if len(piece) != length:
                        raise CopyFailed(f"{source} sent {len(piece)} bytes of {final.name} "
                                         f"where {length} were asked for; replicate again")
                    data.update(piece)
                    await self.blocking(_write, handle, piece, offset)
                if data.hexdigest() != digest:
                    raise CopyFailed(
                        f"{final.name} from {source} does not match the SHA-256 it gave: it "
                        "changed while it was copied, or was damaged on the way; replicate again"
                    )
                await self.blocking(_fsync, handle)
                del handle
                bound.info("replication_boot_file", file=final.name, bytes=size, source=source)
        except BaseException:
            for temporary, _final in fetched:
                temporary.unlink(missing_ok=True)
            raise
        return fetched

    async def _finish(
        self, job: Job, manifest: mf.Manifest, info: dict[str, Any], bound: FilteringBoundLogger,
        boot_files: list[tuple[Path, Path]],
    ) -> None:
        record, image = job.record, job.image
        if image.exists() and not os.path.samefile(image, job.partial):
            raise CopyFailed(f"{image} appeared on {self.config.name} while it was copied; "
                             "nothing was replaced: remove one of them and replicate again")
        await self.blocking(self._set_properties, image, record.version, info)
        await self.blocking(write_manifest, image, manifest)
        for temporary, final in boot_files:  # before the image: a version boots once served
            await self.blocking(os.replace, temporary, final)
        await self.blocking(_put_in_place, job.partial, image, manifest.created_ns)
        key = StatKey.of(os.stat(image), shared=job.store.shared)
        top = mf.node_digest(manifest.levels[-1])
        await self.blocking(lambda: write_verified(image, Verified(key, top), log=bound))
        job.record_path.unlink(missing_ok=True)
        job.meter.stop(time.monotonic())
        deadline = time.monotonic() + PUBLISH_WAIT
        while self.server.catalog.holding(record.vdisk, record.identity) is None:
            if time.monotonic() > deadline:
                bound.warning("replication_not_served_yet", path=str(image),
                              hint="the catalog has not published it yet; see its log")
                break
            await asyncio.sleep(0.1)
        job.state, job.finished = tr.State.DONE, time.time()
        meter = job.meter.to_json(time.monotonic())
        bound.info(
            "replication_done", source=job.source, path=str(image),
            bytes_transferred=job.meter.transferred, bytes_total=job.meter.total,
            seconds=meter["seconds"], mb_per_s=round(job.meter.rate(0) / 1e6, 1),
            hint="pvsctl vdisk versions shows which servers hold it now",
        )

    def _set_properties(self, image: Path, version: int, info: dict[str, Any]) -> None:
        """The version's state as the source has it, before the image appears (a target must
        never get it in a state the source does not give it)."""
        path = properties_path(image)
        text, state = info.get("properties"), info.get("state")
        known = isinstance(state, str) and state in VersionState.__members__
        wanted = VersionState(str(state)) if known else None
        if not path.exists():
            if isinstance(text, str):
                write_atomically(path, text)
            elif wanted in (None, VersionState.production):
                return  # a version missing from a properties file is production
        if wanted is not None and load_properties(path).state_of(version) is not wanted:
            set_version_state(path, version, wanted)

    # -- talking to the source --------------------------------------------------------------

    async def _get(self, source: str, address: str, path: str) -> bytes:
        """A signed GET to ``source``'s admin API; retried on a lost connection."""
        for attempt in range(RETRIES + 1):
            try:
                return await self._send("GET", source, address, path)
            except _Transient as error:
                if attempt == RETRIES:
                    raise CopyFailed(f"lost {source} ({address}): {error}; check that its pvsd "
                                     "runs, then replicate again (the copy resumes)") from None
                log.warning("replication_retry", source=source, error=str(error),
                            attempt=attempt + 1)
                await asyncio.sleep(2**attempt)
        raise AssertionError("unreachable")

    async def _report_bad(self, source: str, address: str, base: str, block: int) -> None:
        """Tell the source which block it sent wrong twice, so that it reads the block
        again itself (a confirmed mismatch withdraws its copy, as a target's report does)."""
        body = json.dumps({"block": block}).encode()
        try:
            await self._send("POST", source, address, f"{base}/damage", body)
        except (CopyFailed, _Transient) as error:
            log.warning("replication_report_failed", source=source, error=str(error),
                        hint=f"check {source}'s copy: pvsctl vdisk verify there")

    async def _send(
        self, method: str, source: str, address: str, path: str, body: bytes = b""
    ) -> bytes:
        if self._client is None:
            raise CopyFailed(f"{self.config.name} is stopping")
        peers = self._peers
        try:
            target = peers.target(address)
        except ValueError as error:
            raise CopyFailed(f"{source}: admin address {error}") from None
        headers = {"Authorization": admin_auth.sign(
            self.config.site_key, method, path, body, time.time_ns() // 1_000_000,
            target=target,
        )}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                async with self._client.request(
                    method, peers.url(address, path), data=body or None, headers=headers,
                    **peers.options(source),
                ) as response:
                    status = response.status
                    length = response.content_length
                    if length is None or length > MAX_ANSWER:
                        raise CopyFailed(f"{source} ({address}) answered with {length} bytes, "
                                         "not a bounded answer: is it the same pvs?")
                    body = await response.read()
        except TimeoutError:
            raise _Transient(f"no answer within {REQUEST_TIMEOUT:g} s") from None
        except aiohttp.ClientConnectorCertificateError as error:
            raise CopyFailed(
                f"{source} ({address}) showed a certificate the site CA does not vouch for as "
                f"{source!r} ({error.certificate_error}); give it one made by pvsctl site certs"
            ) from None
        except aiohttp.ClientError as error:
            raise _Transient(str(error) or type(error).__name__) from None
        if status != 200:
            try:
                reason = json.loads(body).get("error")
            except (ValueError, AttributeError):
                reason = body[:200].decode("utf-8", "replace")
            raise CopyFailed(f"{source} ({address}) refused the copy: {reason}")
        return body


def _boot_file_info(source: str, kind: boot.BootFile, about: object) -> tuple[int, str]:
    """Size and SHA-256 of a boot file as the source describes it, checked."""
    if isinstance(about, dict):
        size, digest = about.get("size"), about.get("sha256")
        if (
            isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_BOOT_FILE
            and isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)
        ):
            return size, digest
        if isinstance(size, int) and size > MAX_BOOT_FILE:
            raise CopyFailed(f"the {kind.what} of the version on {source} is {size} bytes, more "
                             f"than {MAX_BOOT_FILE} copied along with a version: check it")
    raise CopyFailed(f"{source} described the version's {kind} file in a way this pvsd does "
                     "not understand; run the same pvs version on every server")


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a task group's failure that is not a cancellation."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group


class _Transient(Exception):
    """A request that may succeed if sent again."""


# -- blocking file work (worker threads) --------------------------------------------------------


def _hash_file(partial: ImageFile, shape: mf.Shape, checked: list[int]) -> bytes:
    """The leaf digests of the partial image as it is on disk (``checked[0]``: bytes so far)."""
    parts: list[bytes] = []
    for offset in range(0, shape.size, HASH_CHUNK):
        length = min(HASH_CHUNK, shape.size - offset)
        data = os.pread(partial.fd, length, offset)
        data += bytes(length - len(data))  # shorter than it should be: zeros, as truncate does
        parts.extend(mf.hash_blocks(data, shape.block_size))
        checked[0] = offset + length
    leaves = b"".join(parts)
    assert len(leaves) == shape.blocks * DIGEST_SIZE
    return leaves


def _check_and_write(
    partial: ImageFile, manifest: mf.Manifest, run: tr.Run, data: bytes
) -> list[int]:
    """Write ``data`` for ``run`` if every block matches its digest; else the bad blocks."""
    bad = tr.bad_blocks(manifest, run, data)
    if not bad:
        _write(partial, data, run.first * manifest.block_size)
    return bad


def _write(partial: ImageFile, data: bytes, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(partial.fd, view[done:], offset + done)


def _truncate(partial: ImageFile, size: int) -> None:
    os.ftruncate(partial.fd, size)


def _fsync(partial: ImageFile) -> None:
    os.fsync(partial.fd)


def _put_in_place(partial: Path, image: Path, created_ns: int) -> None:
    """The image's mtime is the version's creation time (as ``cp -p`` of an imported image
    keeps it); link, unlike rename, refuses to replace an image that appeared meanwhile."""
    os.utime(partial, ns=(created_ns, created_ns))
    try:
        os.link(partial, image)
    except FileExistsError:
        if os.path.samefile(partial, image):  # linked before a crash, not yet unlinked
            os.unlink(partial)
            return
        raise CopyFailed(f"{image} appeared while it was copied; nothing was replaced: remove "
                         "one of them and replicate again") from None
    os.unlink(partial)
    directory = os.open(image.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _iso(seconds: float) -> str:
    if not seconds:
        return ""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")
