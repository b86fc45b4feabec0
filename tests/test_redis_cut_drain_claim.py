"""A bare Redis drain cut by its caller while it claims gives the claim back before it raises.

Found by a helper's probe: two ``RedisStore`` instances on one prefix; store A's drain, cut
by a deadline of 0.05 to 1.5 ms, raised with its claim script's reply unread, so the claim
stayed "in doubt" in A's memory only, and B's drain a moment later skipped the claimed
command and handed out the device's next one first (51 of 51 cuts). The command came out
only when A drained that device again, or past the 30 s claim lease.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from amqp_queue.state import RedisStore
from tests.backends import REDIS_URL, redis_prefix


async def test_a_drain_cut_while_claiming_leaves_the_command_to_the_next_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rnd = random.Random(4)
    caplog.set_level(logging.INFO, logger="amqp_queue.state.redis")
    async with redis_prefix() as prefix:
        url = f"{REDIS_URL}?prefix={prefix}"
        async with await RedisStore.connect(url) as a, await RedisStore.connect(url) as b:
            cuts = 0
            for n in range(100):
                device = f"dev-{n}"
                await a.enqueue(device, b"first", 600)
                try:
                    async with asyncio.timeout(rnd.uniform(0.00005, 0.0015)):
                        drained = await a.drain_pending(device)
                except TimeoutError:
                    cuts += 1
                    await a.enqueue(device, b"second", 600)
                    assert await b.drain_pending(device) == [b"first", b"second"], (
                        f"after {cuts} cuts"
                    )
                else:
                    assert drained == [b"first"]
            assert cuts >= 5
    # Given back at INFO: a gateway polling with short deadlines cuts drains every day.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("cut short" in r.getMessage() for r in caplog.records)
