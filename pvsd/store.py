"""vDisk stores: directories of images, watched so that no identity outlives the bytes it names.

A replica's identity is its manifest's (``NAME.manifest``, see ``pvsd/manifest.py``), published
only while the image is known to match it. A target may move between servers only onto a
replica with the same identity, so a Standard Image whose file changed stops advertising its
identity at once and is checked against its manifest again: a match publishes it again, a
mismatch makes the replica *damaged* (never served, shown with its first bad offset). A Private
Image changes under its writer, who keeps its manifest current: its changes only reload the
manifest. Anything in a store that could be served wrongly (odd name, symlink out of the store,
not a regular file, bad properties) is refused with one warning that says what to do.

The catalog owns every pass over the images (checks, re-checks of reported blocks, the scrub)
as tasks of its task group; the hashing itself runs in worker threads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import stat
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

import structlog
from structlog.typing import FilteringBoundLogger

from pvs_protocol.identity import ReplicaIdentity
from pvs_protocol.manifest import DEFAULT_BLOCK_SIZE, ManifestError, leaf_digest, node_digest
from pvs_protocol.modes import Mode, VersionState
from pvsd import locks
from pvsd.identity import (
    ImageChanged,
    StatKey,
    Verified,
    read_verified,
    wait_until_settled,
    write_verified,
)
from pvsd.manifest import (
    DEFAULT_THREADS,
    ManifestFile,
    Progress,
    build_manifest_keyed,
    load_manifest,
    manifest_path,
    verify_image,
    write_manifest,
)
from pvsd.names import InvalidName, validate_name
from pvsd.properties import PropertiesError, VDiskProperties, load_properties, properties_path
from pvsd.versions import parse_key

IMAGE_SUFFIX = ".img"

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")

Listener = Callable[[str, "VDisk | None"], None]
"""Called with a catalog key (``NAME`` or ``NAME@N``) and its current replica, or None once it
is no longer served."""

_Observation = tuple[
    StatKey | None, StatKey | None, StatKey | None, StatKey | None, StatKey | None
]
"""Stat keys of the directory entry, of the file it leads to, of the properties file, of the
manifest and of the writer lock (a lock released lets a torn Private Image manifest be
repaired, although no file of the image changed)."""


class ImageFile:
    """An open read-only image, closed once nobody holds it any more.

    When an image is replaced the watcher gives the `VDisk` a new `ImageFile` and simply drops
    the old one. A reader that holds the old object keeps its descriptor open, so the number
    can never be reused for another file while a read is on its way.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        self._finalizer()


@dataclasses.dataclass(eq=False)
class VDisk:
    """One replica of a vDisk, as served by this server."""

    name: str
    """The vDisk's name, as targets and administrators use it."""
    path: Path
    store: Store = dataclasses.field(repr=False)
    properties: VDiskProperties
    file: ImageFile = dataclasses.field(repr=False)
    """Hold this object (not just its `fd`) for as long as you read from it."""
    stat: StatKey
    identity: ReplicaIdentity | None = None
    """The identity served: None while the replica is being checked, from the moment a change
    is noticed until it is checked again, and while it is damaged."""
    manifest_key: StatKey | None = None
    """Stat key of ``NAME.manifest`` when last looked at (None: there is none)."""
    manifest: ManifestFile | None = None
    """The manifest loaded for this replica (kept, for display, while damaged)."""
    damage: Damage | None = None
    """Set while the content is known not to match the manifest: never served then."""
    writer: int = 0
    """Session id of this server's writer of a Private Image, 0 when none."""
    progress: Progress | None = None
    """The pass over the image running now, if any (see ``activity``)."""
    activity: str = ""
    """What that pass is: "manifest" (adopting), "verify", "recheck" or "scrub"."""
    last_scrub: float = 0.0
    """When a scrub pass last completed over this replica (time.time(), 0: never)."""
    key: str = ""
    """The image file's stem (``NAME`` or ``NAME@N``): the catalog's key for this copy."""
    file_version: int | None = None
    """The version its file name says (``NAME@N.img``); None for a plain ``NAME.img``."""

    @property
    def version(self) -> int:
        """Which version of the vDisk this file holds: its name says, else its manifest,
        else (before the manifest is read) its properties."""
        if self.file_version is not None:
            return self.file_version
        if self.manifest is not None:
            return self.manifest.version
        return self.properties.version

    @property
    def state(self) -> VersionState:
        return self.properties.state_of(self.version)

    @property
    def mode(self) -> Mode:
        """How it is served: a maintenance version is written through by its one maintenance
        device, as a Private Image is."""
        if self.state is VersionState.maintenance:
            return Mode.private
        return self.properties.mode

    @property
    def fd(self) -> int:
        return self.file.fd

    @property
    def size(self) -> int:
        return self.stat.size

    @property
    def known_identity(self) -> ReplicaIdentity | None:
        """The manifest's identity, even while withdrawn or damaged: for display only."""
        return self.manifest.identity if self.manifest is not None else None

    @property
    def servable(self) -> bool:
        return self.identity is not None and self.damage is None


@dataclasses.dataclass(frozen=True, slots=True)
class Damage:
    """A replica whose content does not match its manifest."""

    first_offset: int
    """Offset of the first block known bad."""
    bad_blocks: int
    """Blocks known bad: a lower bound until ``complete``."""
    found_by: str
    """"verify" (at start or after a change), "scrub", "target" (a target's DAMAGED report,
    confirmed here), "manifest" (the manifest file itself is damaged) or "size"."""
    since: float
    """time.time() when it was found."""
    complete: bool = False
    """Whether ``bad_blocks`` comes from a pass over the whole image."""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    vdisk: VDisk
    removed: bool = False
    rehash: bool = False


class Refusal(Exception):
    def __init__(self, reason: str, action: str) -> None:
        super().__init__(reason, action)
        self.reason = reason
        self.action = action


class Store:
    """One directory of ``NAME.img`` images, each with its optional ``NAME.vdisk.toml``.

    ``shared`` marks a directory on shared storage, seen by several servers at once.
    """

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self.vdisks: dict[str, VDisk] = {}
        self._root = path.resolve()
        self._observed: dict[str, _Observation] = {}
        self._unreadable: str | None = None

    def poll(self) -> list[Change]:
        """Look at every image once; admit, update, withdraw or drop what changed."""
        try:
            names = {entry.name for entry in os.scandir(self.path)}
        except OSError as error:
            if self._unreadable != str(error):
                self._unreadable = str(error)
                _log.warning(
                    "store_unreadable",
                    store=str(self.path),
                    error=str(error),
                    action="create the directory or fix its permissions",
                )
            names = set()
        else:
            self._unreadable = None
        images = {name for name in names if name.endswith(IMAGE_SUFFIX)}
        changes = [change for gone in self._observed.keys() - images for change in self._drop(gone)]
        for file_name in sorted(images):
            observation = self._observe(file_name)
            if self._observed.get(file_name) != observation:
                self._observed[file_name] = observation
                changes += self._update(file_name)
        return changes

    def close(self) -> None:
        for vdisk in self.vdisks.values():
            vdisk.file.close()

    def _drop(self, file_name: str) -> list[Change]:
        del self._observed[file_name]
        vdisk = self.vdisks.pop(file_name.removesuffix(IMAGE_SUFFIX), None)
        if vdisk is None:
            return []
        vdisk.identity = None
        _log.info("vdisk_removed", vdisk=vdisk.name, version=vdisk.version, store=str(self.path))
        return [Change(vdisk, removed=True)]

    def _update(self, file_name: str) -> list[Change]:
        name = file_name.removesuffix(IMAGE_SUFFIX)
        old = self.vdisks.get(name)
        try:
            file, key, properties = self._admit(file_name)
        except Refusal as refusal:
            _log.warning(
                "vdisk_refused",
                file=str(self.path / file_name),
                reason=refusal.reason,
                action=refusal.action,
            )
            if old is None:
                return []
            del self.vdisks[name]
            old.identity = None
            return [Change(old, removed=True)]
        manifest_key = self._stat_key(manifest_path(self.path / file_name), follow=True)
        if old is None:
            vdisk_name, version = parse_key(name)
            vdisk = VDisk(vdisk_name, self.path / file_name, self, properties, file, key,
                          key=name, file_version=version)
            vdisk.manifest_key = manifest_key
            self.vdisks[name] = vdisk
            _log.info("vdisk_found", vdisk=vdisk_name, version=version, store=str(self.path),
                      size=key.size)
            return [Change(vdisk, rehash=True)]
        if old.stat.same_file(key):
            file.close()
        else:
            old.file = file
        changed = old.stat.changes(key)
        if old.manifest_key != manifest_key:
            changed.append("manifest")
        if old.properties != properties:
            _log.info("vdisk_properties_changed", vdisk=name, store=str(self.path))
        if old.properties.mode != properties.mode:
            changed.append("mode")
        old_state = old.state
        old.stat, old.properties, old.manifest_key = key, properties, manifest_key
        if old.state is not old_state and VersionState.maintenance in (old.state, old_state):
            changed.append("state")  # written through, or read-only: checked again
        if (
            not changed and old.mode is Mode.private and old.identity is None
            and old.damage is None and not old.writer
        ):
            # its lock changed: a manifest left torn by a writer's crashed server can now be
            # repaired, and the image served again
            changed.append("writer lock")
        if not changed:
            return [Change(old)]
        if old.identity is not None and not old.writer:
            # A Private Image's own writer keeps its manifest current: nothing to withdraw.
            old.identity = None
            _log.info("identity_withdrawn", vdisk=name, store=str(self.path), changed=changed)
        return [Change(old, rehash=True)]

    def _admit(self, file_name: str) -> tuple[ImageFile, StatKey, VDiskProperties]:
        path = self.path / file_name
        try:
            validate_name(parse_key(file_name.removesuffix(IMAGE_SUFFIX))[0])
        except InvalidName as error:
            raise Refusal(str(error), "rename the file") from None
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as error:
            raise Refusal(f"cannot be resolved ({error})", "fix or remove the symlink") from None
        if not real.is_relative_to(self._root):
            raise Refusal(
                f"leads to {real}, outside the store",
                "move or copy the image into the store directory",
            )
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer.
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as error:
            raise Refusal(f"cannot be opened ({error.strerror})", "make it readable") from None
        file = ImageFile(fd)
        result = os.fstat(fd)
        if not stat.S_ISREG(result.st_mode):
            file.close()
            raise Refusal("is not a regular file", "replace it with a regular image file")
        os.set_blocking(fd, True)
        try:
            properties = load_properties(properties_path(path))
        except PropertiesError as error:
            file.close()
            raise Refusal(str(error), "fix the file; it is read again when saved") from None
        return file, StatKey.of(result, shared=self.shared), properties

    def manifest_key(self, vdisk: VDisk) -> StatKey | None:
        return self._stat_key(manifest_path(vdisk.path), follow=True)

    def _observe(self, file_name: str) -> _Observation:
        path = self.path / file_name
        return (
            self._stat_key(path, follow=False),
            self._stat_key(path, follow=True),
            self._stat_key(properties_path(path), follow=True),
            self._stat_key(manifest_path(path), follow=True),
            self._stat_key(locks.lock_path(path), follow=True),
        )

    def _stat_key(self, path: Path, *, follow: bool) -> StatKey | None:
        try:
            return StatKey.of(os.stat(path, follow_symlinks=follow), shared=self.shared)
        except OSError:
            return None


class Catalog(Mapping[str, VDisk]):
    """All stores as one key -> replica mapping (the key is the image file's stem, ``NAME`` or
    ``NAME@N``: one entry per version); for a key in several stores the first wins.

    The catalog owns the passes over images: `watch` (or `refresh`) runs them in its task
    group, and a change noticed while a check runs cancels that check and starts another.
    With ``scrub_rate`` > 0, `watch` also scrubs: one replica at a time, at most that many
    bytes per second, every ``scrub_interval`` seconds.
    """

    def __init__(
        self,
        stores: Iterable[Store | Path],
        *,
        progress_interval: float = 2.0,
        scrub_rate: float = 0,
        scrub_interval: float = 86400.0,
        threads: int = DEFAULT_THREADS,
        executor: Executor | None = None,
    ) -> None:
        """``stores`` in priority order; a plain path is a store that is not shared.
        ``executor`` runs every pass over the images (pvsd gives its background pool, so that
        hashing never holds the threads serving reads wait for; None: the loop's default)."""
        self.stores = tuple(store if isinstance(store, Store) else Store(store) for store in stores)
        self.scrub_rate = scrub_rate
        self.scrub_interval = scrub_interval
        self._progress_interval = progress_interval
        self._threads = threads
        self._executor = executor
        self._view: dict[str, VDisk] = {}
        self._shadowed: set[tuple[str, Path]] = set()
        self._listeners: list[Listener] = []
        self._checking: dict[VDisk, asyncio.Task[None]] = {}
        self._rechecks: dict[VDisk, asyncio.Task[None]] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._scrubbing: VDisk | None = None
        self._scanned = False
        self._ready = asyncio.Event()

    def __getitem__(self, key: str) -> VDisk:
        return self._view[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)

    def versions(self, name: str) -> dict[int, VDisk]:
        """Every version of vDisk ``name`` served here, by number (a plain ``NAME.img`` and a
        ``NAME@N.img`` of the same number: the versioned file wins)."""
        found = {v: d for (n, v), d in self.by_version(lambda vdisk: vdisk.name == name).items()}
        return dict(sorted(found.items()))

    def by_version(
        self, wanted: Callable[[VDisk], bool] = lambda _vdisk: True
    ) -> dict[tuple[str, int], VDisk]:
        """(vDisk, version) -> the copy served, in one pass over the catalog."""
        found: dict[tuple[str, int], VDisk] = {}
        for vdisk in self._view.values():
            if not wanted(vdisk):
                continue
            key = (vdisk.name, vdisk.version)
            if key not in found or vdisk.file_version is not None:
                found[key] = vdisk
        return found

    def replica(self, name: str, version: int) -> VDisk | None:
        return self.versions(name).get(version)

    def holding(self, name: str, identity: ReplicaIdentity) -> VDisk | None:
        """Our copy with exactly this identity, if we serve one now."""
        vdisk = self.versions(name).get(identity.version)
        return vdisk if vdisk is not None and vdisk.identity == identity else None

    def names(self) -> list[str]:
        """The vDisks served here (each may have several versions)."""
        return sorted({vdisk.name for vdisk in self._view.values()})

    def on_change(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` whenever a served name appears, goes, or its replica changes
        (identity withdrawn or published, damage found, properties edited). Returns the
        unsubscribe call."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def ready(self) -> None:
        """Wait until every vDisk of the first scan is checked (or failed to be); needs
        `watch`."""
        await self._ready.wait()

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the stores every ``interval`` seconds (and scrub) until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            try:
                if self.scrub_rate > 0:
                    tasks.create_task(self._scrub_forever(), name="scrub")
                while True:
                    self._poll(tasks)
                    await asyncio.sleep(interval)
            finally:
                self._tasks = None

    async def refresh(self) -> None:
        """Scan once and wait for the checks it starts: for one-shot callers such as pvsctl."""
        async with asyncio.TaskGroup() as tasks:
            self._poll(tasks)

    def close(self) -> None:
        for store in self.stores:
            store.close()

    # -- what sessions and the admin API use --------------------------------------------------

    def report_damage(self, vdisk: VDisk, block: int, *, reporter: str) -> bool:
        """A target says block ``block`` of ``vdisk`` does not match the manifest: read it
        again here (a task of the catalog). False if not started: a re-check of this replica
        already runs, it is already damaged, or the catalog is not watching."""
        if (
            self._tasks is None or vdisk in self._rechecks or vdisk.damage is not None
            or vdisk.manifest is None
        ):
            return False
        self._rechecks[vdisk] = self._tasks.create_task(
            self._recheck(vdisk, block, reporter), name=f"recheck {vdisk.path}"
        )
        return True

    def wrote(self, vdisk: VDisk, identity: ReplicaIdentity, *, tell: bool = False) -> None:
        """A Private Image's writer recorded a write: the identity follows its new root.
        ``tell`` (after a FLUSH, at the session's end) tells the listeners too; every write
        would flood the site with inventories."""
        if vdisk.damage is not None:
            return
        vdisk.identity = identity
        if tell and self._view.get(vdisk.key) is vdisk:
            self._notify(vdisk.key, vdisk)

    def writer_left(self, vdisk: VDisk, session_id: int) -> None:
        """The writer's session ended: later changes of the files are someone else's."""
        if vdisk.writer == session_id:
            vdisk.writer = 0
            if vdisk.manifest is not None and vdisk.damage is None:
                self.wrote(vdisk, vdisk.manifest.identity, tell=True)

    def scrub_status(self) -> dict[str, dict[str, object]]:
        """Per served vDisk: the pass running over it (if any), its damage and last scrub."""
        status: dict[str, dict[str, object]] = {}
        for name, vdisk in sorted(self._view.items()):
            progress = vdisk.progress
            status[name] = {
                "activity": vdisk.activity or "idle",
                "progress": progress.to_json() if progress is not None else None,
                "damage": vdisk.damage.to_json() if vdisk.damage is not None else None,
                "last_scrub": vdisk.last_scrub or None,
                "scrub_rate": self.scrub_rate,
            }
        return status

    # -- the watcher --------------------------------------------------------------------------

    def _poll(self, tasks: asyncio.TaskGroup) -> None:
        touched: set[VDisk] = set()
        for store in self.stores:
            for change in store.poll():
                vdisk = change.vdisk
                touched.add(vdisk)
                if change.removed or change.rehash:
                    for running in (self._checking.pop(vdisk, None),
                                    self._rechecks.pop(vdisk, None)):
                        if running is not None:
                            running.cancel()
                if change.rehash:
                    self._checking[vdisk] = tasks.create_task(
                        self._check(vdisk), name=f"check {vdisk.path}"
                    )
        self._rebuild_view(touched)
        self._scanned = True
        self._check_ready()

    def _rebuild_view(self, touched: set[VDisk]) -> None:
        view: dict[str, VDisk] = {}
        shadowed: set[tuple[str, Path]] = set()
        for store in self.stores:
            for name, vdisk in sorted(store.vdisks.items()):
                if name not in view:
                    view[name] = vdisk
                    continue
                shadowed.add((name, store.path))
                if (name, store.path) not in self._shadowed:
                    _log.warning(
                        "vdisk_shadowed",
                        vdisk=name,
                        file=str(vdisk.path),
                        served=str(view[name].path),
                        action="rename or remove one of them; only the first store's is served",
                    )
        old, self._view, self._shadowed = self._view, view, shadowed
        for name in sorted(old.keys() | view.keys()):
            current = view.get(name)
            if current is not old.get(name) or current in touched:
                self._notify(name, current)

    async def _in_background(self, work: Callable[[], _T]) -> _T:
        """Blocking file work of a pass, in the catalog's executor (never the serving one)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _current(self, vdisk: VDisk) -> bool:
        return vdisk.store.vdisks.get(vdisk.key) is vdisk

    async def _check(self, vdisk: VDisk) -> None:
        log = _log.bind(vdisk=vdisk.name, version=vdisk.file_version, store=str(vdisk.store.path))
        try:
            await self._check_replica(vdisk, log)
        except ImageChanged:
            # The next poll sees the new stat key and starts another check.
            log.info("identity_deferred", reason="the image changed while it was read")
        except OSError as error:
            log.warning(
                "identity_failed",
                error=str(error),
                action="check the image and manifest files; they are checked again when "
                "they change",
            )
        finally:
            if vdisk.activity in ("manifest", "verify"):
                vdisk.progress, vdisk.activity = None, ""
            if self._checking.get(vdisk) is asyncio.current_task():
                del self._checking[vdisk]
            self._check_ready()

    async def _check_replica(self, vdisk: VDisk, log: FilteringBoundLogger) -> None:
        private = vdisk.mode is Mode.private
        if private and vdisk.writer and vdisk.manifest is not None:
            self._publish(vdisk, vdisk.manifest, log)  # our writer keeps it current
            return
        path, shared = vdisk.path, vdisk.store.shared
        repair = private and locks.read_owner(path) is None
        loaded: ManifestFile | None
        try:
            loaded = await self._in_background(
                functools.partial(load_manifest, path, repair=repair, shared=shared)
            )
        except FileNotFoundError:
            loaded = await self._adopt(vdisk, log)
        except ManifestError as error:
            if private:
                log.warning(
                    "manifest_unreadable", error=str(error),
                    action="it is read again when it changes; if it stays so, run "
                    f"'pvsctl vdisk manifest {vdisk.name}' while no target writes it",
                )
                return
            self._damaged(vdisk, Damage(0, 0, "manifest", time.time()), log, error=str(error))
            return
        if loaded is None or not self._current(vdisk):
            return
        if vdisk.file_version is not None and loaded.version != vdisk.file_version:
            vdisk.manifest = loaded
            self._damaged(vdisk, Damage(0, 0, "manifest", time.time()), log,
                          error=f"{vdisk.path.name} holds version {vdisk.file_version}, its "
                          f"manifest says version {loaded.version}")
            return
        manifest = vdisk.manifest = loaded
        if vdisk.file_version is None and manifest.version != vdisk.properties.version:
            log.warning(
                "manifest_version_differs", manifest=manifest.version,
                properties=vdisk.properties.version,
                action=f"run 'pvsctl vdisk manifest {vdisk.name}' to make the content a new "
                "version; the manifest's version is the one served",
            )
        if manifest.size != vdisk.stat.size:
            first = min(manifest.size, vdisk.stat.size)
            first -= first % manifest.block_size
            blocks = -(-abs(manifest.size - vdisk.stat.size) // manifest.block_size)
            self._damaged(vdisk, Damage(first, blocks, "size", time.time(), complete=False), log,
                          error=f"image is {vdisk.stat.size} bytes, its manifest says "
                          f"{manifest.size}")
            return
        if private:
            # Its writer keeps the digests current; the scrub checks it, never a login.
            self._publish(vdisk, manifest, log)
            return
        if read_verified(path) == Verified(vdisk.stat, manifest.top):
            log.info("identity_cached", identity=manifest.identity.short)
            self._publish(vdisk, manifest, log)
            return
        await wait_until_settled(path)
        vdisk.progress, vdisk.activity = Progress(manifest.size), "verify"
        verdict = await verify_image(
            path, manifest, log=log, progress_interval=self._progress_interval,
            progress=vdisk.progress, threads=self._threads, shared=shared,
            executor=self._executor,
        )
        if not self._current(vdisk) or vdisk.manifest is not manifest:
            return
        if verdict.stat != vdisk.stat:
            raise ImageChanged(f"{path} changed since it was looked at")
        if verdict.good:
            write_verified(path, Verified(verdict.stat, manifest.top), log=log)
            self._publish(vdisk, manifest, log)
        else:
            self._damaged(
                vdisk, Damage(verdict.first_bad, verdict.bad_blocks, "verify", time.time(),
                              complete=True), log,
            )

    async def _adopt(
        self, vdisk: VDisk, log: FilteringBoundLogger
    ) -> ManifestFile | None:
        """An image without a manifest: make one from its content (version from its
        properties, creation time its mtime, so cp -p copies agree) and trust it."""
        await wait_until_settled(vdisk.path)
        vdisk.progress, vdisk.activity = Progress(vdisk.stat.size), "manifest"
        manifest, key = await build_manifest_keyed(
            vdisk.path, vdisk.version, None, DEFAULT_BLOCK_SIZE, log=log,
            progress_interval=self._progress_interval, threads=self._threads,
            shared=vdisk.store.shared, executor=self._executor,
        )
        if not self._current(vdisk) or key != vdisk.stat:
            return None
        try:
            write_manifest(vdisk.path, manifest, exclusive=True)
        except FileExistsError:
            log.info("manifest_arrived", hint="a manifest was copied in while one was being "
                     "made from the image: the copied one is used")
            return await self._in_background(
                functools.partial(load_manifest, vdisk.path, shared=vdisk.store.shared)
            )
        write_verified(vdisk.path, Verified(key, node_digest(manifest.levels[-1])), log=log)
        # our own write: the next poll must not take it for a manifest copied in
        vdisk.manifest_key = vdisk.store.manifest_key(vdisk)
        log.warning(
            "manifest_adopted", identity=manifest.identity.short, path=str(vdisk.path),
            hint="the image had no manifest: one was made from its present content; make "
            "versions with 'pvsctl vdisk create/import/manifest' so every replica carries the "
            "manifest of the version, and damage is told apart from a new version",
        )
        return await self._in_background(
            functools.partial(load_manifest, vdisk.path, shared=vdisk.store.shared)
        )

    def _publish(
        self, vdisk: VDisk, manifest: ManifestFile, log: FilteringBoundLogger
    ) -> None:
        vdisk.manifest, vdisk.damage = manifest, None
        vdisk.identity = manifest.identity
        log.info("identity_published", identity=manifest.identity.short)
        if self._view.get(vdisk.key) is vdisk:
            self._notify(vdisk.key, vdisk)

    def _damaged(
        self, vdisk: VDisk, damage: Damage, log: FilteringBoundLogger,
        error: str = "",
    ) -> None:
        """Withdraw the replica at once and tell the listeners (the site advertises it)."""
        vdisk.identity, vdisk.damage = None, damage
        log.error(
            "replica_damaged", first_bad_offset=damage.first_offset,
            bad_blocks=damage.bad_blocks, found_by=damage.found_by, complete=damage.complete,
            error=error or None,
            action=f"this copy of {vdisk.name} does not match its manifest and is not served: "
            f"replace {vdisk.path.name} (and its .manifest) with a copy from a server where "
            "the vDisk is not damaged",
        )
        if self._view.get(vdisk.key) is vdisk:
            self._notify(vdisk.key, vdisk)

    # -- damage reported by a target, and the scrub ------------------------------------------

    async def _recheck(self, vdisk: VDisk, block: int, reporter: str) -> None:
        log = _log.bind(vdisk=vdisk.name, version=vdisk.version, store=str(vdisk.store.path),
                        block=block,
                        reporter=reporter)
        manifest, image = vdisk.manifest, vdisk.file
        try:
            assert manifest is not None
            if not 0 <= block < manifest.shape.blocks:
                log.warning("damage_report_ignored", reason="no such block",
                            hint="the target reported a block past the end of the vDisk")
                return
            start, length = manifest.shape.block_range(block)
            data = await self._in_background(functools.partial(os.pread, image.fd, length, start))
            expected = await self._in_background(functools.partial(manifest.leaves, block, 1))
            if leaf_digest(data) == expected:
                log.warning(
                    "damage_report_not_confirmed", offset=start,
                    hint="the block is good here: damaged in transit, or a faulty target",
                )
                return
            if vdisk.manifest is not manifest or vdisk.damage is not None:
                return
            self._damaged(vdisk, Damage(start, 1, "target", time.time()), log)
            await wait_until_settled(vdisk.path)
            vdisk.progress, vdisk.activity = Progress(manifest.size), "recheck"
            verdict = await verify_image(
                vdisk.path, manifest, log=log, progress_interval=self._progress_interval,
                progress=vdisk.progress, threads=self._threads, shared=vdisk.store.shared,
                executor=self._executor,
            )
            found = self._damage_of(vdisk, manifest)
            if found is not None:
                first = min(start, verdict.first_bad) if verdict.first_bad >= 0 else start
                self._damaged(vdisk, dataclasses.replace(
                    found, first_offset=first, bad_blocks=max(verdict.bad_blocks, 1),
                    complete=True), log)
        except (OSError, ImageChanged) as error:
            log.warning("damage_recheck_failed", error=str(error),
                        action="check the image file; it is checked again when it changes")
        finally:
            if vdisk.activity == "recheck":
                vdisk.progress, vdisk.activity = None, ""
            if self._rechecks.get(vdisk) is asyncio.current_task():
                del self._rechecks[vdisk]

    async def _scrub_forever(self) -> None:
        """Re-read every replica against its manifest, one at a time, rate-limited, forever."""
        await self.ready()
        while True:
            for vdisk in list(self._view.values()):
                if self._view.get(vdisk.key) is vdisk and self._scrubbable(vdisk):
                    await self._scrub(vdisk)
            await asyncio.sleep(self.scrub_interval)

    def _scrubbable(self, vdisk: VDisk) -> bool:
        return (
            vdisk.servable and vdisk.manifest is not None and not vdisk.writer
            and vdisk not in self._checking and vdisk not in self._rechecks
        )

    async def _scrub(self, vdisk: VDisk) -> None:
        log = _log.bind(vdisk=vdisk.name, version=vdisk.version, store=str(vdisk.store.path))
        manifest, key = vdisk.manifest, vdisk.stat
        if manifest is None:
            return

        def withdraw(offset: int) -> None:
            # A mismatch withdraws the replica now, not at the end of the pass.
            if vdisk.manifest is manifest and vdisk.stat == key and vdisk.damage is None:
                self._damaged(vdisk, Damage(offset, 1, "scrub", time.time()), log)

        vdisk.progress, vdisk.activity = Progress(manifest.size), "scrub"
        try:
            verdict = await verify_image(
                vdisk.path, manifest, log=log, progress_interval=self._progress_interval,
                rate=self.scrub_rate, progress=vdisk.progress, on_bad=withdraw, direct=True,
                shared=vdisk.store.shared, what="scrub", executor=self._executor,
            )
        except ImageChanged:
            log.info("scrub_skipped", reason="the image changed while it was read")
            return
        except OSError as error:
            log.warning("scrub_failed", error=str(error),
                        action="check the image file and the disk it lives on")
            return
        finally:
            if vdisk.activity == "scrub":
                vdisk.progress, vdisk.activity = None, ""
        vdisk.last_scrub = time.time()
        if vdisk.manifest is not manifest or vdisk.stat != key:
            return
        found = self._damage_of(vdisk, manifest)
        if verdict.good:
            log.info("scrub_clean", identity=manifest.identity.short)
        elif found is not None and found.found_by == "scrub":
            self._damaged(vdisk, dataclasses.replace(
                found, first_offset=verdict.first_bad, bad_blocks=verdict.bad_blocks,
                complete=True), log)

    @staticmethod
    def _damage_of(vdisk: VDisk, manifest: ManifestFile) -> Damage | None:
        """The damage of ``vdisk`` if it still has ``manifest`` (after a pass over it)."""
        return vdisk.damage if vdisk.manifest is manifest else None

    def _notify(self, name: str, vdisk: VDisk | None) -> None:
        for listener in list(self._listeners):
            listener(name, vdisk)

    def _check_ready(self) -> None:
        if self._scanned and not self._checking:
            self._ready.set()
