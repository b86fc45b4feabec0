"""Batcher: concurrent submissions share flushes; a failed flush reaches whoever waits on it."""

from __future__ import annotations

import asyncio

import pytest

from amqp_queue.batching import Batcher


async def test_submissions_made_during_a_flush_share_the_next_one() -> None:
    flushed: list[list[int]] = []
    flushing = asyncio.Event()
    finish = asyncio.Event()

    async def flush(items: list[int]) -> None:
        flushed.append(items)
        flushing.set()
        await finish.wait()

    batcher = Batcher(flush, max_batch=3)
    first = asyncio.create_task(batcher.submit(0))
    await flushing.wait()  # the first flush is under way with 0 alone
    rest = [batcher.post(n) for n in range(1, 8)]  # queued at once, while it runs
    finish.set()
    await asyncio.gather(first, *rest)

    assert flushed == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_a_failed_flush_fails_its_waiters_and_reports_detached_items_once() -> None:
    reported: list[BaseException] = []

    async def flush(items: list[str]) -> None:
        if "bad" in items:
            raise OSError("disk I/O error")

    batcher = Batcher(flush, max_batch=10, on_detached_failure=reported.append)
    waited = batcher.post("bad")
    batcher.post_detached("mark-1")
    batcher.post_detached("mark-2")
    with pytest.raises(OSError, match="disk I/O error"):
        await waited
    await batcher.drain()

    assert [str(exc) for exc in reported] == ["disk I/O error"]

    batcher.post_detached("fine")
    await batcher.drain()
    assert len(reported) == 1


async def test_a_flush_that_refuses_some_items_fails_only_their_waiters() -> None:
    async def flush(items: list[str]) -> dict[int, BaseException]:
        return {index: ValueError(item) for index, item in enumerate(items) if "full" in item}

    batcher = Batcher(flush, max_batch=10)
    results = await asyncio.gather(
        batcher.submit("a"), batcher.submit("full-b"), batcher.submit("c"), return_exceptions=True
    )

    assert results[0] is None
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "full-b"
    assert results[2] is None


async def test_a_lingering_detached_item_rides_with_the_next_waited_one() -> None:
    flushed: list[list[str]] = []

    async def flush(items: list[str]) -> None:
        flushed.append(items)

    batcher = Batcher(flush, max_batch=10, linger=60.0)
    batcher.post_detached("mark-1")
    await asyncio.sleep(0)  # no flush of its own starts
    await batcher.submit("write-2")

    assert flushed == [["mark-1", "write-2"]]


async def test_a_lingering_detached_item_is_flushed_alone_after_the_linger() -> None:
    flushed = asyncio.Queue[list[str]]()

    async def flush(items: list[str]) -> None:
        flushed.put_nowait(items)

    batcher = Batcher(flush, max_batch=10, linger=0.01)
    batcher.post_detached("mark-1")
    batcher.post_detached("mark-2")
    async with asyncio.timeout(5):
        assert await flushed.get() == ["mark-1", "mark-2"]


async def test_drain_flushes_what_lingers_at_once() -> None:
    flushed: list[list[str]] = []

    async def flush(items: list[str]) -> None:
        flushed.append(items)

    batcher = Batcher(flush, max_batch=10, linger=60.0)
    batcher.post_detached("mark-1")
    async with asyncio.timeout(5):
        await batcher.drain()

    assert flushed == [["mark-1"]]


async def test_drain_returns_under_a_steady_stream_of_items() -> None:
    """drain() waits for what was submitted before it, not for what keeps coming: a worker
    fed every millisecond never ends, and a drain waiting for it never returned."""

    async def flush(items: list[int]) -> None:
        await asyncio.sleep(0.005)

    batcher = Batcher(flush, max_batch=10)
    stop = asyncio.Event()

    async def feed() -> None:
        n = 0
        while not stop.is_set():
            batcher.post_detached(n)
            n += 1
            await asyncio.sleep(0.001)

    feeding = asyncio.create_task(feed())
    try:
        await asyncio.sleep(0.02)
        async with asyncio.timeout(2):
            await batcher.drain()
    finally:
        stop.set()
        await feeding


async def test_a_withdrawn_item_is_not_flushed_and_a_drain_waits_for_all_before_it() -> None:
    # A review: withdraw counted the item as flushed, so a drain begun before a later item
    # was withdrawn returned while an earlier one still waited for its flush.
    flushed: list[list[str]] = []
    gate = asyncio.Event()

    async def flush(items: list[str]) -> None:
        await gate.wait()
        gate.clear()
        flushed.append(items)

    batcher = Batcher(flush, max_batch=10)
    batcher.post("a")
    await asyncio.sleep(0)  # a's flush is under way
    batcher.post("b")
    before = batcher.post("x")  # withdrawn, counted by the drain
    drained = asyncio.ensure_future(batcher.drain())
    await asyncio.sleep(0)  # the drain counts a, b and x
    after = batcher.post("c")  # withdrawn, after the drain
    assert batcher.withdraw(after)
    assert batcher.withdraw(before)
    assert after.cancelled()
    assert before.cancelled()
    gate.set()
    await asyncio.sleep(0.01)
    assert flushed == [["a"]]
    assert not drained.done()  # b is still to flush
    gate.set()
    await asyncio.wait_for(drained, 1)
    assert flushed == [["a"], ["b"]]
    assert not batcher.withdraw(after)  # once only
