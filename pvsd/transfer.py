"""Replicating a vDisk version between servers: every decision, without I/O and without a clock.

`pvsd.replicator` (the receiving server's runtime) and `pvsd.admin_replication` (the admin
API) do the reading, writing and talking; what they decide comes from here, so that it can be
tested exhaustively with canned inputs:

- which server a copy comes from and which servers get one (`plan_replication`);
- which blocks the receiver still has to fetch, given its partial copy and the manifest
  (`plan_blocks`): a block whose local bytes already match their leaf digest is good, whatever
  was recorded about it (a journal could lie after a crash, the bytes cannot), and a block the
  manifest says is all zeros is never fetched, so the copy stays sparse;
- how requests are cut (`request_bytes`, `requests`) and paced (`TokenBucket`);
- what progress is reported: bytes good, bytes moved, rate and time left (`Meter`);
- the small record beside a partial copy that lets a restarted server resume it
  (`ResumeRecord`).

Time is always passed in (``now``, seconds of a monotonic clock), as in aioquic.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence

from pvs_protocol import manifest as mf
from pvs_protocol.identity import DIGEST_SIZE, ReplicaIdentity

MAX_REQUEST = 4 * 1024 * 1024
"""Largest range of image bytes (or manifest bytes) one request may ask for: a bounded
buffer on both sides, and a small loss when one answer is bad and is fetched again."""
RATE_WINDOW = 5.0
"""Seconds over which the transfer rate (and so the time left) is averaged."""
REQUESTS_PER_SECOND = 4
"""A rate-limited copy asks for about a quarter of a second of its rate at a time, so the
limiter works on small steps and progress moves smoothly."""
PARTIAL_SUFFIX = ".partial"
RECORD_SUFFIX = ".replication.json"


# -- file names -------------------------------------------------------------------------------


def partial_name(image_file: str) -> str:
    """``NAME@N.img`` -> ``.NAME@N.partial``: a name the store scanner ignores (it starts
    with a dot and does not end in .img), in the same directory, so the finished copy is
    put in place by a rename within one file system."""
    return "." + image_file.removesuffix(".img") + PARTIAL_SUFFIX


def record_name(image_file: str) -> str:
    """``NAME@N.img`` -> ``.NAME@N.replication.json``, beside the partial image."""
    return "." + image_file.removesuffix(".img") + RECORD_SUFFIX


# -- rates ------------------------------------------------------------------------------------

def format_rate(rate: float) -> str:
    """``52428800`` -> ``50.0 MiB/s``; 0 -> ``unlimited``."""
    if rate <= 0:
        return "unlimited"
    value, unit = float(rate), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}/s"


# -- which blocks to fetch --------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def zero_leaf(length: int) -> bytes:
    """The leaf digest of ``length`` zero bytes (a whole block, or a short last one)."""
    return mf.leaf_digest(bytes(length))


class Kind(enum.Enum):
    GOOD = "good"
    """The local bytes match the leaf digest: nothing to do."""
    FETCH = "fetch"
    """To be fetched from the source."""
    ZERO = "zero"
    """The manifest says all zeros but the local bytes differ: written as zeros here."""


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """Consecutive blocks with the same fate."""

    first: int
    count: int
    kind: Kind


@dataclasses.dataclass(frozen=True, slots=True)
class BlockPlan:
    shape: mf.Shape
    runs: tuple[Run, ...]
    """The blocks to fetch or zero, in order (good blocks are left out)."""
    good_bytes: int
    """Bytes of the image already good locally (counted as done from the start)."""

    @property
    def fetch_bytes(self) -> int:
        return sum(range_bytes(self.shape, r)[1] for r in self.runs if r.kind is Kind.FETCH)

    @property
    def zero_bytes(self) -> int:
        return sum(range_bytes(self.shape, r)[1] for r in self.runs if r.kind is Kind.ZERO)

    @property
    def complete(self) -> bool:
        return not self.runs


def plan_blocks(manifest: mf.Manifest, local_leaves: bytes | None) -> BlockPlan:
    """What the receiver still has to do, given the leaf digests of its partial copy.

    ``local_leaves``: the digests of the partial image's blocks as they are on disk now
    (None: a new, sparse file of zeros, which needs no reading). Whole pages of digests are
    compared at once; only pages that differ are looked at block by block, so a copy that is
    nearly done or nearly empty is planned at memory speed.
    """
    shape = manifest.shape
    leaves = manifest.levels[0]
    blocks = shape.blocks
    if local_leaves is not None and len(local_leaves) != len(leaves):
        raise ValueError(f"{len(local_leaves) // DIGEST_SIZE} local digests for {blocks} blocks")
    full_zero = zero_leaf(shape.block_size)
    last_zero = zero_leaf(shape.block_range(blocks - 1)[1]) if blocks else full_zero
    zero_page = full_zero * mf.FANOUT

    def zero_digest(index: int) -> bytes:
        return last_zero if index == blocks - 1 else full_zero

    runs: list[Run] = []

    def add(index: int, kind: Kind) -> None:
        if runs and runs[-1].kind is kind and runs[-1].first + runs[-1].count == index:
            runs[-1] = Run(runs[-1].first, runs[-1].count + 1, kind)
        else:
            runs.append(Run(index, 1, kind))

    for first in range(0, blocks, mf.FANOUT):
        count = min(mf.FANOUT, blocks - first)
        begin, end = first * DIGEST_SIZE, (first + count) * DIGEST_SIZE
        wanted = leaves[begin:end]
        local = local_leaves[begin:end] if local_leaves is not None else None
        if local is not None and wanted == local:
            continue
        whole_page = count == mf.FANOUT and first + count < blocks
        if whole_page and wanted == zero_page and (local is None or local == zero_page):
            continue
        for index in range(first, first + count):
            at = (index - first) * DIGEST_SIZE
            digest = wanted[at : at + DIGEST_SIZE]
            have = local[at : at + DIGEST_SIZE] if local is not None else zero_digest(index)
            if digest != have:
                add(index, Kind.ZERO if digest == zero_digest(index) else Kind.FETCH)
    plan = BlockPlan(shape, tuple(runs), 0)
    good_bytes = shape.size - sum(range_bytes(shape, run)[1] for run in runs)
    return dataclasses.replace(plan, good_bytes=good_bytes)


def request_bytes(rate: float, block_size: int, limit: int = MAX_REQUEST) -> int:
    """Bytes per request: whole blocks, at most ``limit``, about a quarter second of
    ``rate`` when there is one (0: no limit), and never less than one block."""
    size = limit if rate <= 0 else min(limit, int(rate / REQUESTS_PER_SECOND))
    return max(block_size, size - size % block_size)


def requests(plan: BlockPlan, size: int) -> Iterator[Run]:
    """The runs of ``plan`` cut into pieces of at most ``size`` bytes (whole blocks)."""
    per = max(1, size // plan.shape.block_size)
    for run in plan.runs:
        for first in range(run.first, run.first + run.count, per):
            yield Run(first, min(per, run.first + run.count - first), run.kind)


def bad_blocks(manifest: mf.Manifest, run: Run, data: bytes | memoryview) -> list[int]:
    """The blocks of ``run`` that ``data`` (what the source sent for it) does not hold
    correctly: every one of them if the length is wrong, else those whose digest differs."""
    shape = manifest.shape
    start, length = range_bytes(shape, run)
    if len(data) != length:
        return list(range(run.first, run.first + run.count))
    view = memoryview(data)
    bad = []
    for index in range(run.first, run.first + run.count):
        at = index * shape.block_size - start
        piece = view[at : at + shape.block_range(index)[1]]
        if mf.leaf_digest(piece) != manifest.leaf(index):
            bad.append(index)
    return bad


def range_bytes(shape: mf.Shape, run: Run) -> tuple[int, int]:
    """Offset and length of the image bytes of ``run``."""
    start = run.first * shape.block_size
    end = min((run.first + run.count) * shape.block_size, shape.size)
    return start, end - start


# -- pacing -----------------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to ``burst`` bytes.

    ``reserve(amount, now)`` takes the tokens (the balance may go negative) and says how long
    to wait before sending, so a request larger than the burst is still allowed, just paced.
    Rate 0 means no limit.
    """

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = max(rate, 0.0)
        self.burst = burst if burst is not None else self.rate / REQUESTS_PER_SECOND
        self._tokens = self.burst
        self._last = now

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)
        self.rate = max(rate, 0.0)
        self.burst = self.rate / REQUESTS_PER_SECOND
        self._tokens = min(self._tokens, self.burst)

    def reserve(self, amount: int, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)


# -- progress ---------------------------------------------------------------------------------


class State(enum.StrEnum):
    COPYING = "copying"
    DONE = "done"
    FAILED = "failed"


class Step(enum.StrEnum):
    """What a copy in state copying does now."""

    WAITING = "waiting for the source"
    MANIFEST = "fetching the manifest"
    CHECKING = "checking the partial copy"
    FETCHING = "fetching blocks"
    FINISHING = "finishing"


class Meter:
    """Bytes good out of the image size, bytes moved, and the rate over the last seconds."""

    def __init__(self, total: int, now: float) -> None:
        self.total = total
        self.done = 0
        """Bytes known good locally (blocks fetched and checked, or found good)."""
        self.transferred = 0
        """Bytes received from the source by this run of the copy."""
        self.remaining = total
        """Bytes still to fetch."""
        self.started = now
        self.ended: float | None = None
        """When the copy ended: its rate is then the average over the whole copy."""
        self._samples: deque[tuple[float, int]] = deque([(now, 0)])

    def start(self, plan: BlockPlan, now: float) -> None:
        """The plan of this run: what is good already counts as done."""
        self.total = plan.shape.size
        self.done = plan.good_bytes
        self.remaining = plan.fetch_bytes
        self.started = now
        self.ended = None
        self._samples = deque([(now, 0)])

    def stop(self, now: float) -> None:
        self.ended = now

    def fetched(self, received: int, good: int, now: float) -> None:
        """``received`` bytes arrived from the source, making ``good`` bytes good."""
        self.transferred += received
        self.done = min(self.total, self.done + good)
        self.remaining = max(0, self.remaining - good)
        self._samples.append((now, self.transferred))
        while len(self._samples) > 2 and self._samples[1][0] < now - RATE_WINDOW:
            self._samples.popleft()

    def zeroed(self, good: int) -> None:
        self.done = min(self.total, self.done + good)

    def rate(self, now: float) -> float:
        """Bytes per second over about the last `RATE_WINDOW` seconds (once ended, over the
        whole copy)."""
        if self.ended is not None:
            return self.transferred / max(self.ended - self.started, 1e-6)
        when, moved = self._samples[0]
        if now - when < 0.2:
            return 0.0
        return (self.transferred - moved) / (now - when)

    def seconds_left(self, now: float) -> float | None:
        rate = self.rate(now)
        if self.remaining == 0:
            return 0.0
        return self.remaining / rate if rate > 0 else None

    @property
    def percent(self) -> float:
        return round(100 * self.done / self.total, 1) if self.total else 100.0

    def to_json(self, now: float) -> dict[str, object]:
        left = self.seconds_left(now)
        return {
            "bytes_done": self.done, "bytes_total": self.total, "percent": self.percent,
            "bytes_transferred": self.transferred, "bytes_to_fetch": self.remaining,
            "rate": round(self.rate(now)), "seconds_left": round(left, 1) if left is not None
            else None, "seconds": round((self.ended or now) - self.started, 2),
        }


# -- the record beside a partial copy ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ResumeRecord:
    """What a restarted receiver needs to go on with a copy: which version of which vDisk,
    the identity it must end with, where it came from and how fast. Which blocks are done is
    deliberately not recorded: they are checked against the manifest instead."""

    vdisk: str
    version: int
    identity: ReplicaIdentity
    source: str
    rate: float | None = None
    """Bytes per second asked for (0: no limit); None: the receiver's replication_rate."""
    started_ns: int = 0
    error: str = ""
    """Set once the copy failed: shown, and not resumed at start (replicate again to retry)."""

    def encode(self) -> str:
        return json.dumps({
            "vdisk": self.vdisk, "version": self.version, "identity": self.identity.to_json(),
            "source": self.source, "rate": self.rate, "started_ns": self.started_ns,
            "error": self.error,
        }, indent=2) + "\n"

    @classmethod
    def decode(cls, text: str) -> ResumeRecord:
        """ValueError if the record is not one this version wrote."""
        try:
            data = json.loads(text)
            identity = ReplicaIdentity.from_json(data["identity"])
            rate = data.get("rate")
            record = cls(
                data["vdisk"], data["version"], identity, data["source"],
                float(rate) if rate is not None else None, int(data.get("started_ns", 0)),
                str(data.get("error", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed replication record ({error})") from None
        if not isinstance(record.vdisk, str) or not isinstance(record.source, str):
            raise ValueError("malformed replication record (names)")
        if not isinstance(record.version, int) or record.version != identity.version:
            raise ValueError("malformed replication record (version)")
        return record


# -- which source, which destinations ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Copy:
    """One server's copy of one version, as the site view tells it."""

    identity: ReplicaIdentity | None
    """None while its server checks it."""
    damaged: bool = False
    maintenance: bool = False
    """The version is in maintenance there: written through by its maintenance device."""


@dataclasses.dataclass(frozen=True, slots=True)
class SiteServer:
    """A server and its copies of the vDisk being replicated."""

    name: str
    up: bool
    """Heard from recently (its admin API can be asked)."""
    serving: bool
    """Up and its stream service serving."""
    load: float = 0.0
    copies: Mapping[int, Copy] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicationPlan:
    vdisk: str
    version: int
    identity: ReplicaIdentity
    source: str
    destinations: tuple[str, ...]
    """Servers to be asked to copy (they may still find they hold it, or refuse)."""
    identical: tuple[str, ...]
    """Servers that already hold an identical copy (the source among them)."""
    down: tuple[str, ...] = ()
    """With ``all``: servers that are down, left out."""


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    status: int
    message: str


def plan_replication(
    servers: Sequence[SiteServer], vdisk: str, version: int | None, to: Iterable[str] | None,
) -> ReplicationPlan | Refused:
    """Where version ``version`` (None: the newest any server holds) of ``vdisk`` comes from
    and goes to (``to`` None: every server that is up).

    The source is a serving server with a copy that is not damaged and carries the preferred
    identity of that version (the newest manifest, as placement prefers); among several, the
    least loaded, then by name, so that every server decides alike.
    """
    holders = [s for s in servers if s.copies]
    if not holders:
        return Refused(404, f"no server of the site holds a vDisk named {vdisk!r}; see "
                            "pvsctl vdisks")
    held = sorted({v for s in holders for v in s.copies})
    if version is None:
        version = held[-1]
    elif version not in held:
        return Refused(404, f"no server holds version {version} of {vdisk}; versions held: "
                            f"{', '.join(map(str, held))} (see pvsctl vdisk versions {vdisk})")
    with_version = sorted((s for s in holders if version in s.copies), key=lambda s: s.name)
    good = [
        s for s in with_version
        if s.serving and s.copies[version].identity is not None
        and not s.copies[version].damaged
    ]
    if not good:
        return Refused(409, _no_source(vdisk, version, with_version))
    identities = [i for s in good if (i := s.copies[version].identity) is not None]
    identity = max(identities, key=lambda i: (i.timestamp_ns, i.digest))
    sources = [s for s in good if s.copies[version].identity == identity]
    source = min(sources, key=lambda s: (s.load, s.name))
    if source.copies[version].maintenance:
        return Refused(409, f"version {version} of {vdisk} is in maintenance: its maintenance "
                            "device writes it, on one server only; promote it first (pvsctl "
                            f"vdisk version promote {vdisk}), then replicate it")
    by_name = {s.name: s for s in servers}
    wanted: list[str]
    if to is None:
        wanted = sorted(by_name)
    else:
        wanted = list(dict.fromkeys(to))
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            return Refused(404, f"no server named {', '.join(map(repr, unknown))} in this site; "
                                f"known servers: {', '.join(sorted(by_name))} (see pvsctl "
                                "servers)")
        if not wanted:
            return Refused(400, "no destination: name servers with --to SERVER, or use --all")
    destinations, identical, down = [], [], []
    for name in wanted:
        server = by_name[name]
        copy = server.copies.get(version)
        if copy is not None and copy.identity == identity and not copy.damaged:
            identical.append(name)
        elif not server.up:
            if to is not None:
                return Refused(409, f"{name} is down: it cannot copy anything; start its pvsd "
                                    "and run the command again, or leave it out")
            down.append(name)
        else:
            destinations.append(name)
    return ReplicationPlan(
        vdisk, version, identity, source.name, tuple(destinations), tuple(identical),
        tuple(down),
    )


def _no_source(vdisk: str, version: int, holders: Sequence[SiteServer]) -> str:
    damaged = [s.name for s in holders if s.copies[version].damaged]
    checking = [
        s.name for s in holders if s.copies[version].identity is None
        and not s.copies[version].damaged and s.serving
    ]
    idle = [s.name for s in holders if not s.serving and not s.copies[version].damaged]
    parts = []
    if damaged:
        parts.append(f"damaged on {', '.join(damaged)}")
    if checking:
        parts.append(f"still being checked on {', '.join(checking)}")
    if idle:
        parts.append(f"on {', '.join(idle)}, which {'is' if len(idle) == 1 else 'are'} not "
                     "serving")
    hint = "wait until its check ends and run the command again" if checking and not damaged \
        else "start a server that holds a good copy, or restore one from a backup"
    return (f"no good copy of {vdisk} version {version} to copy from: "
            f"{'; '.join(parts)}; {hint}")
