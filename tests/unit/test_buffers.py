"""The block buffer pool and the rule that a written buffer returns only once it is sent."""

from __future__ import annotations

import asyncio
import socket

from pvs_protocol.buffers import MIN_SIZE, BufferPool, Lent, PoolBuffer

BIG = 1024 * 1024


def test_buffers_are_reused_by_size() -> None:
    pool = BufferPool()
    first = pool.take(BIG)
    assert type(first) is PoolBuffer and len(first) == BIG
    pool.give([first])
    assert pool.held == BIG
    assert pool.take(BIG) is first
    assert pool.held == 0
    assert pool.take(BIG) is not first  # given out once, not twice


def test_small_buffers_are_plain_and_never_kept() -> None:
    pool = BufferPool()
    small = pool.take(MIN_SIZE - 1)
    assert type(small) is bytearray
    pool.give([small])
    assert pool.held == 0


def test_only_pool_buffers_are_taken_back() -> None:
    pool = BufferPool()
    pool.give([bytearray(BIG), b"x" * BIG, memoryview(bytearray(BIG))])
    assert pool.held == 0


def test_pool_keeps_at_most_its_limit() -> None:
    pool = BufferPool(limit=2 * BIG)
    buffers = [pool.take(BIG) for _ in range(3)]
    pool.give(buffers)
    assert pool.held == 2 * BIG


async def test_written_buffer_returns_only_after_the_transport_sent_it() -> None:
    """A peer that does not read keeps our buffer in the transport; once it reads, the
    buffer comes back to the pool, and the peer got exactly the bytes that were written."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    pool = BufferPool()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        lent = Lent(pool.give, transport, loop)
        payload = pool.take(4 * BIG)
        payload[:] = bytes(range(256)) * (len(payload) // 256)
        expected = bytes(payload)
        transport.write(payload)
        lent.written(payload)
        await asyncio.sleep(0.05)
        assert transport.get_write_buffer_size() > 0  # the peer has not read: still held
        assert pool.held == 0
        received = bytearray()
        async with asyncio.timeout(10):
            while len(received) < len(expected):
                received += await loop.sock_recv(theirs, 1 << 20)
        assert received == expected
        lent.written(pool.take(MIN_SIZE))  # the next write looks again
        await asyncio.sleep(0.05)
        assert pool.held == 4 * BIG + MIN_SIZE
    finally:
        transport.close()
        theirs.close()
