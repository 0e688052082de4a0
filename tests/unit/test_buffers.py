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
    """A peer that does not read keeps our buffers in the transport; as it reads, each buffer
    comes back once its last byte is sent (not before), and the peer gets exactly the bytes
    that were written."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    pool = BufferPool()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        lent = Lent(pool.give, transport, loop)
        first, second = pool.take(4 * BIG), pool.take(2 * BIG)
        first[:] = bytes(range(256)) * (len(first) // 256)
        second[:] = bytes(range(255, -1, -1)) * (len(second) // 256)
        expected = b"head" + bytes(first) + bytes(second)
        transport.writelines([b"head", first])
        lent.wrote([b"head", first])
        transport.write(second)
        lent.wrote([second])
        await asyncio.sleep(0.05)
        assert transport.get_write_buffer_size() > 0  # the peer has not read: still held
        assert pool.held == 0
        received = bytearray()
        async with asyncio.timeout(10):
            while len(received) < 4 + len(first) + BIG:  # all of first, half of second
                received += await loop.sock_recv(theirs, 64 * 1024)
            while pool.held != 4 * BIG:
                await asyncio.sleep(0.005)
            assert transport.get_write_buffer_size() > 0  # second is not all sent
            while len(received) < len(expected):
                received += await loop.sock_recv(theirs, 1 << 20)
            while pool.held != 6 * BIG:
                await asyncio.sleep(0.005)
        assert received == expected
    finally:
        transport.close()
        theirs.close()


async def test_a_peer_that_never_reads_holds_no_more_than_the_limit() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    pool = BufferPool()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        lent = Lent(pool.give, transport, loop, limit=2 * BIG)
        for _ in range(8):
            buffer = pool.take(BIG)
            transport.write(buffer)
            lent.wrote([buffer])
        assert lent.holding <= 2 * BIG
    finally:
        transport.abort()
        theirs.close()


def test_a_full_pool_makes_room_for_the_size_now_in_use() -> None:
    pool = BufferPool(limit=4 * BIG)
    quarter = BIG // 4
    old = [pool.take(quarter) for _ in range(16)]
    pool.give(old)
    assert pool.held == 4 * BIG
    big = [pool.take(BIG) for _ in range(4)]  # nothing of this size yet: new ones
    pool.give(big)
    assert pool.held == 4 * BIG
    again = [pool.take(BIG) for _ in range(4)]
    assert {id(b) for b in again} == {id(b) for b in big}  # all kept, in place of the old size
    assert pool.held == 0
