"""vDisk stores: directories of images, watched so that no identity outlives the bytes it names.

A target may move between servers only onto a replica with the same identity, so a replica
whose file changed must stop advertising its old identity at once, before anyone re-hashes it.
The watcher therefore withdraws first and computes later. Anything in a store that could be
served wrongly (odd name, symlink out of the store, not a regular file, bad properties) is
refused with one warning that says what to do, and never served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import structlog

from pvs_protocol.identity import ReplicaIdentity
from pvsd.identity import ImageChanged, StatKey, load_identity
from pvsd.names import InvalidName, validate_name
from pvsd.properties import PropertiesError, VDiskProperties, load_properties, properties_path

IMAGE_SUFFIX = ".img"

_log = structlog.get_logger(__name__)

Listener = Callable[[str, "VDisk | None"], None]
"""Called with a vDisk name and its current replica, or None once it is no longer served."""

_Observation = tuple[StatKey | None, StatKey | None, StatKey | None]
"""Stat keys of the directory entry, of the file it leads to, and of the properties file."""


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
    path: Path
    store: Store = dataclasses.field(repr=False)
    properties: VDiskProperties
    file: ImageFile = dataclasses.field(repr=False)
    """Hold this object (not just its `fd`) for as long as you read from it."""
    stat: StatKey
    identity: ReplicaIdentity | None = None
    """None while hashing, and from the moment a change is noticed until it is hashed again."""

    @property
    def fd(self) -> int:
        return self.file.fd

    @property
    def size(self) -> int:
        return self.stat.size


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
        _log.info("vdisk_removed", vdisk=vdisk.name, store=str(self.path))
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
        if old is None:
            vdisk = VDisk(name, self.path / file_name, self, properties, file, key)
            self.vdisks[name] = vdisk
            _log.info("vdisk_found", vdisk=name, store=str(self.path), size=key.size)
            return [Change(vdisk, rehash=True)]
        if old.stat.same_file(key):
            file.close()
        else:
            old.file = file
        changed = old.stat.changes(key)
        if old.properties.version != properties.version:
            changed.append("version")
        if old.properties != properties:
            _log.info("vdisk_properties_changed", vdisk=name, store=str(self.path))
        old.stat, old.properties = key, properties
        if not changed:
            return [Change(old)]
        if old.identity is not None:
            old.identity = None
            _log.info("identity_withdrawn", vdisk=name, store=str(self.path), changed=changed)
        return [Change(old, rehash=True)]

    def _admit(self, file_name: str) -> tuple[ImageFile, StatKey, VDiskProperties]:
        path = self.path / file_name
        try:
            validate_name(file_name.removesuffix(IMAGE_SUFFIX))
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

    def _observe(self, file_name: str) -> _Observation:
        path = self.path / file_name
        return (
            self._stat_key(path, follow=False),
            self._stat_key(path, follow=True),
            self._stat_key(properties_path(path), follow=True),
        )

    def _stat_key(self, path: Path, *, follow: bool) -> StatKey | None:
        try:
            return StatKey.of(os.stat(path, follow_symlinks=follow), shared=self.shared)
        except OSError:
            return None


class Catalog(Mapping[str, VDisk]):
    """All stores as one name -> replica mapping; for a name in several stores the first wins.

    The catalog owns the hashing tasks: `watch` (or `refresh`) runs them in its task group, and
    a change noticed while a hash runs cancels that hash and starts another.
    """

    def __init__(self, stores: Iterable[Store | Path], *, progress_interval: float = 2.0) -> None:
        """``stores`` in priority order; a plain path is a store that is not shared."""
        self.stores = tuple(store if isinstance(store, Store) else Store(store) for store in stores)
        self._progress_interval = progress_interval
        self._view: dict[str, VDisk] = {}
        self._shadowed: set[tuple[str, Path]] = set()
        self._listeners: list[Listener] = []
        self._hashing: dict[VDisk, asyncio.Task[None]] = {}
        self._scanned = False
        self._ready = asyncio.Event()

    def __getitem__(self, name: str) -> VDisk:
        return self._view[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)

    def on_change(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` whenever a served name appears, goes, or its replica changes
        (identity withdrawn or published, properties edited). Returns the unsubscribe call."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def ready(self) -> None:
        """Wait until every vDisk of the first scan is hashed (or failed to be); needs `watch`."""
        await self._ready.wait()

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the stores every ``interval`` seconds until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            while True:
                self._poll(tasks)
                await asyncio.sleep(interval)

    async def refresh(self) -> None:
        """Scan once and wait for the hashes it starts: for one-shot callers such as pvsctl."""
        async with asyncio.TaskGroup() as tasks:
            self._poll(tasks)

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def _poll(self, tasks: asyncio.TaskGroup) -> None:
        touched: set[VDisk] = set()
        for store in self.stores:
            for change in store.poll():
                vdisk = change.vdisk
                touched.add(vdisk)
                if change.removed or change.rehash:
                    running = self._hashing.pop(vdisk, None)
                    if running is not None:
                        running.cancel()
                if change.rehash:
                    self._hashing[vdisk] = tasks.create_task(
                        self._rehash(vdisk), name=f"hash {vdisk.path}"
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

    async def _rehash(self, vdisk: VDisk) -> None:
        log = _log.bind(vdisk=vdisk.name, store=str(vdisk.store.path))
        try:
            identified = await load_identity(
                vdisk.path,
                vdisk.properties.version,
                log=log,
                shared=vdisk.store.shared,
                progress_interval=self._progress_interval,
            )
        except ImageChanged:
            # The next poll sees the new stat key and starts another hash.
            log.info("identity_deferred", reason="the image changed while it was hashed")
        except OSError as error:
            log.warning(
                "identity_failed",
                error=str(error),
                action="check the image file; it is hashed again when it changes",
            )
        else:
            # A result for a file we no longer serve is dropped; the poll that noticed the
            # difference has started (or will start) the right hash.
            if (
                identified.stat == vdisk.stat
                and identified.identity.version == vdisk.properties.version
                and vdisk.store.vdisks.get(vdisk.name) is vdisk
            ):
                vdisk.identity = identified.identity
                log.info("identity_published", identity=identified.identity.short)
                if self._view.get(vdisk.name) is vdisk:
                    self._notify(vdisk.name, vdisk)
        finally:
            if self._hashing.get(vdisk) is asyncio.current_task():
                del self._hashing[vdisk]
            self._check_ready()

    def _notify(self, name: str, vdisk: VDisk | None) -> None:
        for listener in list(self._listeners):
            listener(name, vdisk)

    def _check_ready(self) -> None:
        if self._scanned and not self._hashing:
            self._ready.set()
