"""Review of the channel-open turns (27c64d9): a turn is given back while its open is
still before the broker, so after timeouts or cancellations more than OPENS_IN_FLIGHT
opens are in flight at once, the very overload the turns were meant to bound."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from amqp_queue import channel_pool
from amqp_queue.channel_pool import ChannelPool
from tests.rabbitmq_support import AMQP_URL


async def test_opens_cut_short_still_count_against_the_turns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_flight = most = 0
    gate = asyncio.Event()
    real_open = channel_pool._open

    async def slow(connection: Any, *, robust: bool) -> Any:
        # A broker slow to answer: each open stays before it until the gate opens.
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await gate.wait()
            return await real_open(connection, robust=robust)
        finally:
            in_flight -= 1

    monkeypatch.setattr(channel_pool, "_open", slow)
    connection = await aio_pika.connect_robust(AMQP_URL)
    try:
        pool = ChannelPool(
            connection, channels_per_connection=2_000, max_connections=1, reserved=6, timeout=0.3
        )
        n = channel_pool.OPENS_IN_FLIGHT
        for _ in range(3):  # three waves of callers, each timing out against a slow broker
            await asyncio.gather(
                *(pool.channel("opening a test channel") for _ in range(n)),
                return_exceptions=True,
            )
        print("most opens in flight at once:", most)
        gate.set()
        await asyncio.sleep(1.0)  # the late opens finish and are closed again
        assert most <= n, f"{most} opens before the broker at once, the turns allow {n}"
    finally:
        gate.set()
        await connection.close()
