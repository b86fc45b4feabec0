"""A cancelled task on Redis state ends: redis-py must not swallow the cancellation.

redis-py sends each command under ``asyncio.wait_for(send, socket_timeout)``; on Python 3.11
``wait_for`` returns the inner result and drops a cancellation that arrives while the (all
but instant) send finishes. A ``consume()`` loop cancelled while it asked the index went on
handing out commands, its task never ending, and ``asyncio.timeout()`` around any call
could lose its deadline (found by an adversarial run: 2 to 10 of 60 cancelled consumer
tasks still running 5 s later, Redis state only).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from amqp_queue.state import RedisStore
from tests.backends import REDIS_URL, redis_prefix
from tests.test_adversarial_ninth import space_on

ROUNDS = 25


async def _stuck_after_cancel(
    work: Callable[[], Awaitable[object]],
    *,
    rounds: int = ROUNDS,
    before_cancel: tuple[float, float] = (0.001, 0.01),
    wait: float = 2.0,
    between: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Runs ``work()`` in a task and cancels it at a random moment, ``rounds`` times;
    returns how many tasks were still running ``wait`` seconds after their cancel, or ended
    otherwise than cancelled."""
    stuck = 0
    for _ in range(rounds):
        task = asyncio.ensure_future(work())
        await asyncio.sleep(random.uniform(*before_cancel))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=wait)
        if not done:
            stuck += 1
            task.cancel()
            await asyncio.wait([task], timeout=wait)
        elif not task.cancelled():
            stuck += 1  # it ended by a failure, not by its cancellation
            task.exception()
        if between is not None:
            await between()
    return stuck


def _forever(call: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
    async def loop() -> None:
        while True:
            await call()

    return loop


@pytest.mark.parametrize("made_by", ["url", "client"])
async def test_a_task_cancelled_while_it_reads_the_redis_index_ends(made_by: str) -> None:
    # A client the application built itself, as the design's construction shows, or one
    # the store builds from a URL.
    client = Redis.from_url(REDIS_URL)
    async with redis_prefix() as prefix:
        if made_by == "url":
            store = await RedisStore.connect(REDIS_URL, prefix=prefix)
        else:
            store = RedisStore(client, prefix=prefix)
        async with store, client:
            command_id = await store.enqueue("dev-1", b"x", 60)
            unknown = str(uuid.uuid4())

            assert (
                await _stuck_after_cancel(_forever(lambda: store.is_deliverable(command_id))) == 0
            )
            assert await _stuck_after_cancel(_forever(lambda: store.get(unknown))) == 0
            assert await _stuck_after_cancel(_forever(lambda: store.get_pending("dev-1"))) == 0


async def test_a_cancelled_consume_loop_on_redis_state_ends(tmp_path: Path) -> None:
    async with space_on("redis", tmp_path) as space:
        device = space.device()
        producer, consumer = await space.open(), await space.open()
        for n in range(200):
            await producer.enqueue(device, b"%d" % n, 60)

        async def consume() -> None:
            async with consumer.consume(device) as stream:
                async for _ in stream:
                    pass

        async def five_more() -> None:
            for m in range(5):
                await producer.enqueue(device, b"more%d" % m, 60)

        stuck = await _stuck_after_cancel(
            consume, rounds=30, before_cancel=(0.005, 0.03), wait=5.0, between=five_more
        )
        assert stuck == 0, f"{stuck} of 30 cancelled consume tasks still ran 5 s later"
