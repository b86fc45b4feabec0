"""A task that drains in a loop ends when it is cancelled, or its deadline passes.

Found by a helper's cancellation storm: a ``RabbitMQStore.drain_pending`` cancelled after
its hand-over landed returns what it handed over (nobody else would get it) and took the
cancellation back with ``Task.uncancel()``: the loop went on draining, ``task.cancel()``
never ended the task (6 of 6 cases) and an ``asyncio.timeout()`` around the loop never
fired. The drain still returns what it handed over; the cancellation stays requested, and
the task's next drain raises it. A bare store's drain, which returns what it handed over
likewise since the twenty-first session, must do the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amqp_queue import Store
from tests.backends import BACKENDS, INDEX_BACKENDS
from tests.support import unique

ATTEMPTS = 15


async def _while_fed(store: Store, device: str, attempts: Callable[[], Awaitable[None]]) -> None:
    async def producer() -> None:
        for n in range(100_000):
            await store.enqueue(device, f"c{n}".encode(), 600)
            await asyncio.sleep(0.002)

    feeding = asyncio.create_task(producer())
    try:
        await attempts()
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)


@pytest.mark.parametrize("backend", ["rabbitmq", "rabbitmq-redis", *INDEX_BACKENDS])
async def test_a_cancelled_drain_loop_ends_and_keeps_what_it_got(
    backend: str, tmp_path: Path
) -> None:
    async with BACKENDS[backend](tmp_path) as store:
        device = unique("d")
        got: list[bytes] = []

        async def drain_loop() -> None:
            while True:
                got.extend(await store.drain_pending(device))

        async def attempts() -> None:
            for attempt in range(ATTEMPTS):
                task = asyncio.create_task(drain_loop())
                await asyncio.sleep(0.05 + (attempt % 7) * 0.013)
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=5)
                if not done:
                    task.cancel()
                    await asyncio.wait([task], timeout=5)
                assert done, f"attempt {attempt}: the drain loop went on after task.cancel()"
                assert task.cancelled()

        await _while_fed(store, device, attempts)
        got += await store.drain_pending(device)
        numbers = [int(payload[1:]) for payload in got]
        # Every command enqueued was returned by some drain, once, in order.
        assert numbers == list(range(len(numbers)))


# The delivery layer's drain (any state), and the index's own.
@pytest.mark.parametrize("backend", ["rabbitmq", *INDEX_BACKENDS])
async def test_a_deadline_around_a_drain_loop_fires(backend: str, tmp_path: Path) -> None:
    async with BACKENDS[backend](tmp_path) as store:
        device = unique("d")

        async def drain_for(seconds: float) -> None:
            async with asyncio.timeout(seconds):
                while True:
                    await store.drain_pending(device)

        async def bounded_loop(seconds: float) -> None:
            with pytest.raises(TimeoutError):
                await drain_for(seconds)

        async def attempts() -> None:
            for attempt in range(ATTEMPTS):
                task = asyncio.create_task(bounded_loop(0.05 + (attempt % 7) * 0.013))
                done, _ = await asyncio.wait([task], timeout=5)
                if not done:
                    task.cancel()
                    await asyncio.wait([task], timeout=5)
                assert done, f"attempt {attempt}: the deadline around the loop never fired"
                task.result()

        await _while_fed(store, device, attempts)
