"""The raw-broker baselines: aio-pika publish-with-confirm and a plain consumer, no index."""

from __future__ import annotations

import asyncio
import itertools

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from bench.services import PAYLOAD


def _message() -> aio_pika.Message:
    return aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


async def publish_sequential(exchange: AbstractExchange, devices: list[str], count: int) -> None:
    """One persistent message at a time, each waiting for its publisher confirm."""
    for _, device in zip(range(count), itertools.cycle(devices), strict=False):
        await exchange.publish(_message(), routing_key=device)


async def publish_pipelined(
    exchange: AbstractExchange, devices: list[str], count: int, in_flight: int
) -> None:
    """Persistent messages with up to ``in_flight`` unconfirmed at once."""
    targets = iter(zip(range(count), itertools.cycle(devices), strict=False))

    async def publisher() -> None:
        for _, device in targets:
            await exchange.publish(_message(), routing_key=device)

    await asyncio.gather(*(publisher() for _ in range(min(in_flight, count))))


async def consume(channel: AbstractChannel, queue_name: str, count: int, prefetch: int) -> None:
    """Consumes ``count`` messages with a prefetch window, acking each one after it arrived."""
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True)
    done = asyncio.get_running_loop().create_future()
    received = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal received
        await message.ack()
        received += 1
        if received == count and not done.done():
            done.set_result(None)

    tag = await queue.consume(on_message, no_ack=False)
    try:
        await done
    finally:
        await queue.cancel(tag)
