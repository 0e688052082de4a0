"""Streaming against a real pvsd: byte-exact reads, many targets at once, identity changes, stop.

Every vDisk is made with the real pvsctl from seeded random bytes, so each read is checked
against the bytes on disk, not against what the server says about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from harness import (
    MIB,
    Pvsd,
    RawClient,
    Servers,
    assert_serves,
    image_path,
    logged_in,
    make_vdisk,
    manifest_identity,
    pvs_target,
    pvsctl,
    read_whole,
)

from pvs_protocol.errors import ErrorCode
from pvs_target.client import ConnectionLost, LoginError, ServerError, Session

SIZES = {
    "tiny": 512,
    "odd": 3 * MIB + 512,  # not a multiple of any chunk size used here
    "even": 4 * MIB,
}


@dataclasses.dataclass(frozen=True)
class Site:
    server: Pvsd
    store: Path
    images: dict[str, bytes]


@pytest.fixture(scope="module")
def site(module_servers: Servers) -> Site:
    """One server, shared by the tests that only read, with a vDisk of each size."""
    store = module_servers.workdir / "store"
    for seed, (name, size) in enumerate(SIZES.items(), start=1):
        make_vdisk(store, name, size, seed)
    make_vdisk(store, "blank", MIB, seed=None)  # `pvsctl vdisk create`: sparse, all zeroes
    images = {name: image_path(store, name).read_bytes() for name in [*SIZES, "blank"]}
    server = module_servers("stream", store, vdisks=list(images))
    return Site(server, store, images)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- whole-disk reads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vdisk", "options"),
    [
        ("tiny", []),
        ("odd", []),
        ("odd", ["--chunk", "64K", "--depth", "3", "--no-checksum"]),
        ("odd", ["--chunk", "1000", "--depth", "1"]),  # unaligned requests, one at a time
        ("even", ["--chunk", "4M"]),
        ("blank", []),
    ],
)
def test_cli_reads_whole_disk_byte_exact(
    site: Site, tmp_path: Path, vdisk: str, options: list[str]
) -> None:
    output = tmp_path / "copy.img"
    result = pvs_target(
        "read", "--server", site.server.address, "--vdisk", vdisk, "-o", str(output),
        "--device-id", "cli-target", "--json", "-q", *options,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = site.images[vdisk]
    identity = manifest_identity(site.store, vdisk)  # the manifest of the bytes on disk
    assert report["verified"] is True
    verification = report["verification"]
    assert verification["enabled"] is True and verification["root"] == identity.digest.hex()
    assert verification["blocks_checked"] >= verification["blocks"] == -(
        -len(expected) // identity.block_size
    )
    assert verification["mismatches"] == [] and verification["dropped_servers"] == []
    assert report["sha256"] == sha256(expected)  # of the bytes read
    assert report["identity"] == identity.to_json()
    assert report["bytes"] == report["identity"]["size"] == len(expected)
    assert output.read_bytes() == expected


def test_cli_read_of_an_unknown_vdisk_fails_with_a_message(site: Site) -> None:
    result = pvs_target(
        "read", "--server", site.server.address, "--vdisk", "nosuchdisk", "--json", "-q"
    )
    assert result.returncode == 2
    assert "UNKNOWN_VDISK" in result.stderr and "nosuchdisk" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("vdisk", "max_request", "chunk", "checksum"),
    [
        ("tiny", 4096, None, True),
        ("odd", MIB, None, True),
        ("odd", 64 * 1024, 3 * 1024 * 1024, False),  # chunk capped by the agreed max_request
        ("odd", 4096, 1536, True),  # requests that straddle sectors
        ("odd", 512, None, True),  # the smallest max_request a server must accept
        ("even", 4 * MIB, None, False),
        ("blank", MIB, None, True),
    ],
)
async def test_library_reads_whole_disk_byte_exact(
    site: Site, vdisk: str, max_request: int, chunk: int | None, checksum: bool
) -> None:
    expected = site.images[vdisk]
    async with logged_in(
        site.server.address, vdisk, "lib-target", max_request=max_request, checksum=checksum
    ) as session:
        assert session.size == len(expected)
        assert session.identity == manifest_identity(site.store, vdisk)
        assert session.max_request <= max_request
        data = await read_whole(session, chunk=chunk)
    assert sha256(data) == sha256(expected)


async def test_fifty_concurrent_targets_read_random_ranges_correctly(site: Site) -> None:
    """50 targets, each with its own connection and session, all logged in at once, each
    reading random ranges (pipelined) that are checked against the image on disk."""
    image = site.images["odd"]
    size = len(image)

    async def target(index: int, session_ids: list[int], ready: asyncio.Barrier) -> int:
        rng = random.Random(index)
        max_request = rng.choice([4096, 64 * 1024, MIB])
        async with logged_in(
            site.server.address, "odd", f"target-{index:02d}", max_request=max_request,
            checksum=rng.random() < 0.5,
        ) as session:
            session_ids.append(session.session_id)
            await ready.wait()  # every target is connected before any reads
            ranges = []
            for _ in range(12):
                offset = rng.randrange(size)
                length = rng.randint(1, min(session.max_request, size - offset))
                ranges.append((offset, length))
            results = await asyncio.gather(
                *(session.connection.read(offset, length) for offset, length in ranges)
            )
            for (offset, length), data in zip(ranges, results, strict=True):
                assert data == image[offset : offset + length], (index, offset, length)
            return len(ranges)

    count = 50
    session_ids: list[int] = []
    ready = asyncio.Barrier(count)
    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        tasks = [group.create_task(target(index, session_ids, ready)) for index in range(count)]
    assert sum(task.result() for task in tasks) == count * 12
    assert len(set(session_ids)) == count, "each target must get its own session"
    assert not site.server.trouble()


async def test_pinned_login_with_the_same_identity_is_served(site: Site) -> None:
    async with logged_in(site.server.address, "odd", "pin-target") as first:
        identity = first.identity
    async with logged_in(site.server.address, "odd", "pin-target", pinned=identity) as again:
        assert again.identity == identity
        assert await again.connection.read(4096, 4096) == site.images["odd"][4096:8192]


@pytest.mark.parametrize("field", ["version", "timestamp_ns", "size", "digest"])
async def test_pinned_login_with_a_different_identity_is_refused(site: Site, field: str) -> None:
    async with logged_in(site.server.address, "odd", "pin-target") as first:
        identity = first.identity
    changed: dict[str, Any] = {
        "digest": bytes(reversed(identity.digest)),
        "version": identity.version + 1,
        "timestamp_ns": identity.timestamp_ns + 1,
        "size": identity.size + 512,
    }
    pinned = dataclasses.replace(identity, **{field: changed[field]})
    with pytest.raises(LoginError) as refused:
        async with logged_in(site.server.address, "odd", f"pin-{field}", pinned=pinned):
            pass
    assert refused.value.code is ErrorCode.NO_IDENTICAL_REPLICA
    await site.server.until_log(
        "login_refused", device=f"pin-{field}", code="NO_IDENTICAL_REPLICA"
    )
    await assert_serves(site.server, "odd", site.images["odd"])


# -- the replica changes under a running server ----------------------------------------------


def _flip(data: bytes) -> bytes:
    return bytes(byte ^ 0xFF for byte in data)


CHANGED = 3 * 16384 + 4096
"""Where the in-place change lands: inside the fourth block of the default 16 KiB blocks."""


async def _good_or_refused(session: Session, offset: int, expected: bytes) -> None:
    """A session whose image file changed under it, though its content is again the version
    it pinned: it is served those bytes, or refused (NO_IDENTICAL_REPLICA, retryable: it logs
    in again, pinned). Never other bytes."""
    try:
        data = await session.connection.read(offset, len(expected))
    except ServerError as refused:
        assert refused.code is ErrorCode.NO_IDENTICAL_REPLICA
        assert refused.retryable
    else:
        assert data == expected
    assert session.connection.is_open


@pytest.mark.parametrize(
    ("change", "remedy"),
    [
        ("pwrite", "restore"),  # the admin copies the good bytes back: identical again
        ("pwrite", "manifest"),  # the change was meant: `pvsctl vdisk manifest`, same version
        ("replace", "manifest --version 2"),  # meant, and made version 2
    ],
)
async def test_changed_standard_image_is_damaged_and_never_served_until_remedied(
    pvsd_factory: Servers, tmp_path: Path, change: str, remedy: str
) -> None:
    """A Standard Image whose bytes change without a new manifest is damaged: the session that
    streamed it gets no byte of the new content (its requests are refused, its connection goes
    on), and no target logs in to it. The copy is served again once the good bytes are back
    (same identity: old sessions go on), or once the admin made the bytes a new version (new
    identity: old sessions are refused, new ones get it)."""
    store = tmp_path / "store"
    make_vdisk(store, "live", MIB, seed=11)
    path = image_path(store, "live")
    original = path.read_bytes()
    # scrub off: this is about the watcher, which must notice the change by itself
    server = pvsd_factory(
        "pvs1", store, vdisks=["live"], args=["--watch-interval", "0.1", "--scrub-rate", "0"]
    )

    async with logged_in(server.address, "live", "early-bird") as old:
        assert await old.connection.read(0, 8192) == original[:8192]
        old_identity = old.identity
        assert old_identity == manifest_identity(store, "live")
        block = old_identity.block_size

        if change == "pwrite":  # change bytes in place, as an admin's tool would
            fd = os.open(path, os.O_WRONLY)
            try:
                assert os.pwrite(fd, _flip(original[CHANGED : CHANGED + 512]), CHANGED) == 512
            finally:
                os.close(fd)
            first_bad = CHANGED - CHANGED % block
        else:  # a new file renamed over the image, as a careful copy tool does
            fresh = path.with_name(".live.img.new")
            fresh.write_bytes(_flip(original[:512]) + original[512:])
            os.replace(fresh, path)
            first_bad = 0
        current = path.read_bytes()
        await server.until_log("identity_withdrawn", vdisk="live")
        damaged = await server.until_log("replica_damaged", vdisk="live")
        assert (damaged["first_bad_offset"], damaged["bad_blocks"]) == (first_bad, 1)

        # The session that streamed the old replica gets no byte of the changed one, neither
        # in the changed range nor elsewhere, and its connection goes on (a request failure).
        for offset in (CHANGED, 0, MIB - 512):
            with pytest.raises(ServerError) as refused:
                await old.connection.read(offset, 512)
            assert refused.value.code is ErrorCode.NO_IDENTICAL_REPLICA
        assert old.connection.is_open

        # Nobody logs in to a damaged copy, pinned or not.
        for pinned in (None, old_identity):
            with pytest.raises(LoginError) as refused_login:
                async with logged_in(server.address, "live", "late-comer", pinned=pinned):
                    pass
            assert refused_login.value.code is ErrorCode.NO_IDENTICAL_REPLICA

        if remedy == "restore":  # the good copy back (cp -p of the image from a good server)
            fresh = path.with_name(".live.img.good")
            fresh.write_bytes(original)
            os.replace(fresh, path)
            await server.until_log(
                "identity_published", vdisk="live", count=2, identity=old_identity.short
            )
            # The same version, verified again: the old session gets the good bytes, or is
            # told to log in again (and its pinned login is served, below).
            await _good_or_refused(old, CHANGED, original[CHANGED : CHANGED + 512])
            current, new_identity = original, old_identity
        else:
            pvsctl("vdisk", *remedy.split(), "live", "--store", str(store))
            new_identity = manifest_identity(store, "live")
            await server.until_log("identity_published", vdisk="live",
                                   identity=new_identity.short)
            # A new version: the session of the old one is still refused every byte.
            for offset in (CHANGED, 0, MIB - 512):
                with pytest.raises(ServerError) as refused:
                    await old.connection.read(offset, 512)
                assert refused.value.code is ErrorCode.NO_IDENTICAL_REPLICA
            assert old.connection.is_open

    async with logged_in(server.address, "live", "late-comer") as new:
        assert new.identity == new_identity
        expected = {
            "restore": [],
            "manifest": ["timestamp", "content"],
            "manifest --version 2": ["version", "timestamp", "content"],
        }[remedy]
        assert old_identity.differences(new.identity) == expected
        assert await read_whole(new) == current

    # A target pinned to a version that no longer exists is refused, not served.
    pinned_login = logged_in(server.address, "live", "early-bird", pinned=old_identity)
    if remedy == "restore":
        async with pinned_login as again:
            assert await again.connection.read(CHANGED, 512) == current[CHANGED : CHANGED + 512]
    else:
        with pytest.raises(LoginError) as refused_login:
            async with pinned_login:
                pass
        assert refused_login.value.code is ErrorCode.NO_IDENTICAL_REPLICA
    assert not server.trouble()


async def test_touched_standard_image_keeps_its_identity_until_a_new_version(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    """A new modification time alone is not a new version: the image is checked against its
    manifest again and keeps its identity, so sessions go on. `pvsctl vdisk set --version`
    makes the same bytes a new version: then old sessions are refused and new ones get it."""
    store = tmp_path / "store"
    make_vdisk(store, "live", MIB, seed=11)
    original = image_path(store, "live").read_bytes()
    # scrub off: this is about the watcher, which must notice the change by itself
    server = pvsd_factory(
        "pvs1", store, vdisks=["live"], args=["--watch-interval", "0.1", "--scrub-rate", "0"]
    )

    async with logged_in(server.address, "live", "early-bird") as old:
        assert await old.connection.read(0, 8192) == original[:8192]
        old_identity = old.identity
        os.utime(image_path(store, "live"))  # same bytes, new modification time
        await server.until_log("identity_withdrawn", vdisk="live")
        await server.until_log(
            "identity_published", vdisk="live", count=2, identity=old_identity.short
        )
        assert manifest_identity(store, "live") == old_identity
        await _good_or_refused(old, CHANGED, original[CHANGED : CHANGED + 512])
        async with logged_in(server.address, "live", "early-bird", pinned=old_identity) as same:
            assert same.identity == old_identity

        pvsctl("vdisk", "set", "live", "--store", str(store), "--version", "2")
        new_identity = manifest_identity(store, "live")
        assert old_identity.differences(new_identity) == ["version", "timestamp", "content"]
        await server.until_log("identity_published", vdisk="live", identity=new_identity.short)
        for offset in (CHANGED, 0, MIB - 512):
            with pytest.raises(ServerError) as refused:
                await old.connection.read(offset, 512)
            assert refused.value.code is ErrorCode.NO_IDENTICAL_REPLICA
        assert old.connection.is_open

    async with logged_in(server.address, "live", "late-comer") as new:
        assert new.identity == new_identity
        assert await read_whole(new) == original
    with pytest.raises(LoginError) as refused_login:
        async with logged_in(server.address, "live", "early-bird", pinned=old_identity):
            pass
    assert refused_login.value.code is ErrorCode.NO_IDENTICAL_REPLICA
    assert not server.trouble()


async def test_removed_replica_is_no_longer_served(pvsd_factory: Servers, tmp_path: Path) -> None:
    store = tmp_path / "store"
    make_vdisk(store, "gone", 64 * 1024, seed=13)
    path = image_path(store, "gone")
    original = path.read_bytes()
    server = pvsd_factory("pvs1", store, vdisks=["gone"], args=["--watch-interval", "0.1"])
    async with logged_in(server.address, "gone", "early-bird") as old:
        assert await old.connection.read(0, 4096) == original[:4096]
        path.unlink()
        await server.until_log("vdisk_removed", vdisk="gone")
        with pytest.raises(ServerError) as refused:
            await old.connection.read(0, 4096)
        assert refused.value.code is ErrorCode.NO_IDENTICAL_REPLICA
    with pytest.raises(LoginError) as refused_login:
        async with logged_in(server.address, "gone", "late-comer"):
            pass
    assert refused_login.value.code is ErrorCode.UNKNOWN_VDISK
    assert not server.trouble()


async def test_in_place_write_is_never_streamed_to_a_session_of_the_old_replica(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    make_vdisk(store, "live", MIB, seed=12)
    path = image_path(store, "live")
    original = path.read_bytes()
    # A long watch interval makes the window certain: no poll happens during the test.
    server = pvsd_factory("pvs1", store, vdisks=["live"], args=["--watch-interval", "60"])
    async with logged_in(server.address, "live", "early-bird") as old:
        assert await old.connection.read(4096, 512) == original[4096:4608]
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, _flip(original[4096:4608]), 4096)
        finally:
            os.close(fd)
        try:
            data = await old.connection.read(4096, 512)
        except ServerError as refused:
            assert refused.code is ErrorCode.NO_IDENTICAL_REPLICA
        else:
            assert data == original[4096:4608], (
                "the session was served bytes that are not in the replica it logged in to"
            )


# -- stopping -----------------------------------------------------------------------------------


async def test_sigterm_stops_cleanly_while_targets_are_connected(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    make_vdisk(store, "d", 2 * MIB, seed=21)
    image = image_path(store, "d").read_bytes()
    server = pvsd_factory("pvs1", store, vdisks=["d"], args=["--drain-timeout", "1"])

    async with contextlib.AsyncExitStack() as stack:
        stubborn = await stack.enter_async_context(logged_in(server.address, "d", "stubborn"))
        polite = await stack.enter_async_context(logged_in(server.address, "d", "polite"))
        waiting = await RawClient.connect(server.address)  # in the login phase: no session yet
        stack.push_async_callback(waiting.close)
        await waiting.hello()
        assert await read_whole(stubborn) == image
        assert await polite.connection.read(0, 4096) == image[:4096]

        server.signal(signal.SIGTERM)
        await server.until_log("shutdown_requested")

        # Not yet logged in: told at once that the server is stopping.
        goodbye = await waiting.expect_goodbye()
        assert goodbye is not None and goodbye.code == ErrorCode.STOPPING

        # Streaming targets are asked to log in elsewhere (RELOGIN with a deadline); this one
        # does, and leaves.
        async with asyncio.timeout(15):
            await polite.connection.relogin.wait()
        notice = polite.connection.relogin_notice
        assert notice is not None and notice.deadline_ms > 0
        await polite.close()

        # A target that stays is answered correctly (or told STOPPING) until the server
        # closes its connection with GOODBYE STOPPING.
        try:
            assert await stubborn.connection.read(MIB, 4096) == image[MIB : MIB + 4096]
        except (ServerError, ConnectionLost) as refused:
            assert refused.code is ErrorCode.STOPPING
        async with asyncio.timeout(15):
            await stubborn.connection.wait_closed()
        failure = stubborn.connection.failure
        assert isinstance(failure, ConnectionLost) and failure.code is ErrorCode.STOPPING
        assert stubborn.connection.relogin.is_set(), "it was asked to move before being closed"

        with pytest.raises(LoginError):  # no new logins while stopping
            async with logged_in(server.address, "d", "latecomer", connect_timeout=2):
                pass

    assert server.wait(15) == 0
    assert server.find_logs("stopped"), server.log_tail()
    assert not server.trouble(), server.trouble()


def test_sigterm_on_an_idle_server_exits_zero(pvsd_factory: Servers, tmp_path: Path) -> None:
    make_vdisk(tmp_path / "store", "d", 4096, seed=22)
    server = pvsd_factory("pvs1", vdisks=["d"])
    assert server.stop() == 0
    events = [line["event"] for line in server.log_lines()]
    assert events.index("shutdown_requested") < events.index("stopped")


async def test_login_while_verifying_is_pending_and_sigterm_interrupts_the_check(
    pvsd_factory: Servers, tmp_path: Path
) -> None:
    """A 64 GiB sparse image takes far longer to check against its manifest than this test
    runs: meanwhile logins are refused with IDENTITY_PENDING (retryable), and SIGTERM still
    stops the server at once."""
    store = tmp_path / "store"
    pvsctl("vdisk", "create", "huge", "--size", "64G", "--store", str(store))
    server = pvsd_factory("pvs1", store)
    await server.until_log("verify_started", vdisk="huge")
    with pytest.raises(LoginError) as refused:
        async with logged_in(server.address, "huge", "impatient"):
            pass
    assert refused.value.code is ErrorCode.IDENTITY_PENDING
    assert refused.value.retryable
    assert server.stop() == 0
    assert server.find_logs("stopped")
    assert not server.find_logs("identity_published")


# -- the NBD export's fast path --------------------------------------------------------------


async def test_read_now_answers_by_callback_within_the_server_limit(
    module_servers: Servers,
) -> None:
    """``read_now`` sends at once while the server's in-flight limit allows, queues beyond it
    (sent as answers come back), and hands each answer (data or error) to its callback."""
    store = module_servers.workdir / "narrow-store"
    make_vdisk(store, "narrow", 4 * MIB, seed=41)
    image = image_path(store, "narrow").read_bytes()
    server = module_servers("narrow-fast", store, vdisks=["narrow"],
                            args=["--max-in-flight", "2"])
    async with logged_in(server.address, "narrow") as session:
        connection = session.connection
        loop = asyncio.get_running_loop()
        answers: dict[int, asyncio.Future[Any]] = {}

        def start(offset: int, length: int) -> bool:
            answer = answers[offset] = loop.create_future()
            return connection.read_now(offset, length, answer.set_result)

        assert start(0, MIB) and start(MIB, 4096)
        assert start(2 * MIB, 4096) and start(3 * MIB, 4096)  # beyond the limit: they wait
        assert connection.in_flight == 2
        connection.send_queued()
        for offset, length in [(0, MIB), (MIB, 4096), (2 * MIB, 4096), (3 * MIB, 4096)]:
            assert bytes(await answers[offset]) == image[offset : offset + length]
        assert connection.in_flight == 0
        assert start(4 * MIB - 512, 1024)  # past the end: the server's refusal, by callback
        refused = await answers[4 * MIB - 512]
        assert isinstance(refused, ServerError) and refused.code is ErrorCode.OUT_OF_RANGE
        assert start(0, 4096)
        await session.close()  # the connection ends with the read in flight, or answers it
        ended = await answers[0]
        assert isinstance(ended, ConnectionLost) or bytes(ended) == image[:4096]
