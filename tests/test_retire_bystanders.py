"""A retire on one store must not fail another store's calls for other devices.

Found by a helper's probe: store A retires devices that store B keeps enqueueing to. A
queue deleted between B's declaration and binding made the broker close B's declaring
channel (NOT_FOUND), and every other declaration or deletion waiting on that shared channel
failed with ``BrokerError``, naming the retired device's queue: 20 to 228 of B's calls for
other devices in 20 s (5 of 5 runs). Such a call now runs again on the next channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from pathlib import Path

from amqp_queue import BrokerError
from tests.rabbitmq_support import rabbitmq_store
from tests.support import unique


async def test_retires_on_one_store_fail_no_other_device_s_call_on_another(
    tmp_path: Path,
) -> None:
    exchange, state_url = unique("test."), f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    rnd = random.Random(3)
    failed: collections.Counter[str] = collections.Counter()
    async with (
        rabbitmq_store(tmp_path, exchange=exchange, state_url=state_url) as a,
        rabbitmq_store(tmp_path, exchange=exchange, state_url=state_url) as b,
    ):
        stop = asyncio.Event()
        retired = [f"x{n}" for n in range(6)]

        async def enqueue_to(device: str) -> None:
            while not stop.is_set():
                with contextlib.suppress(BrokerError):  # its own queue retired: relayed
                    await b.enqueue(device, b"p", 600)

        async def retire(device: str) -> None:
            while not stop.is_set():
                await asyncio.sleep(rnd.random() * 0.02)
                with contextlib.suppress(BrokerError):
                    await a.retire_device(device)

        async def bystanders() -> None:
            round_ = 0
            while not stop.is_set():
                others = [f"y{round_}-{n}" for n in range(8)]
                round_ += 1
                for kind, calls in (
                    ("declare", [b.ensure_queue(device) for device in others]),
                    ("retire", [b.retire_device(device) for device in others]),
                ):
                    for outcome in await asyncio.gather(*calls, return_exceptions=True):
                        if isinstance(outcome, BaseException):
                            failed[f"{kind}: {outcome}"[:160]] += 1

        tasks = [asyncio.ensure_future(enqueue_to(device)) for device in retired]
        tasks += [asyncio.ensure_future(retire(device)) for device in retired]
        tasks.append(asyncio.ensure_future(bystanders()))
        await asyncio.sleep(8)
        stop.set()
        await asyncio.gather(*tasks)
        for device in retired:
            await a.retire_device(device)
    assert not failed, dict(failed)
