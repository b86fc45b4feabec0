"""Connected devices: thousands of ``consume()`` streams in one process, each getting commands.

A gateway process with every device online holds one stream per device. Each stream reads its
device queue on a channel of its own, and one connection carries at most 2,000 of them here
(RabbitMQ's ``channel_max`` is 2,047), so 10,000 streams run over five connections. Timed: how
fast the streams open (declare, bind, consume), and how long until each of them has its one
command after all were enqueued. The raw building block is the same with bare aio-pika: one
classic queue and one consumer on a channel of its own per device, the same channels per
connection, one persistent message published to each.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from amqp_queue import PendingCommand, RabbitMQStore
from amqp_queue.stream import CommandStream
from bench.harness import Context, rate
from bench.services import AMQP_URL, PAYLOAD, TTL, delete_queues, device_ids, rabbitmq_store
from bench.services import unique as unique_name

GROUP = "Streams: concurrent consume() in one process"
PER_CONNECTION = 2_000
# Opened this many at a time: a gateway's devices connect over some seconds, not at once.
_OPENING = 200
_RECEIVE_TIMEOUT = 300.0


async def _amqp_queue(devices: list[str], per_connection: int) -> tuple[float, float, int]:
    """Seconds to open every stream, seconds until each has its command, connections used."""
    async with (
        rabbitmq_store(channels_per_connection=per_connection, prefetch=10) as store,
        AsyncExitStack() as stack,
    ):
        started = time.perf_counter()
        streams: list[CommandStream] = []
        for start in range(0, len(devices), _OPENING):
            batch = devices[start : start + _OPENING]
            streams += await asyncio.gather(
                *(stack.enter_async_context(store.consume(device)) for device in batch)
            )
        opened = time.perf_counter() - started
        started = time.perf_counter()
        received = asyncio.gather(*(_first(stream) for stream in streams))
        await _enqueue_all(store, devices)
        async with asyncio.timeout(_RECEIVE_TIMEOUT):
            got = await received
        delivered = time.perf_counter() - started
        if len(got) != len(devices):
            raise RuntimeError(f"{len(got)} of {len(devices)} streams got their command")
        return opened, delivered, store._channels.connections


async def _first(stream: CommandStream) -> PendingCommand:
    return await anext(stream)


async def _enqueue_all(store: RabbitMQStore, devices: list[str]) -> None:
    work = iter(devices)

    async def producer() -> None:
        for device in work:
            await store.enqueue(device, PAYLOAD, TTL)

    await asyncio.gather(*(producer() for _ in range(min(100, len(devices)))))


async def _raw(devices: list[str], per_connection: int) -> tuple[float, float]:
    """The same with bare aio-pika queues and consumers."""
    prefix = unique_name("bench.streams")
    names = [f"{prefix}.{device}" for device in devices]
    connections: list[AbstractRobustConnection] = []
    try:
        for _ in range(0, len(names), per_connection):
            connections.append(await aio_pika.connect_robust(AMQP_URL))
        arrived = asyncio.Event()
        remaining = len(names)

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal remaining
            await message.ack()
            remaining -= 1
            if remaining == 0:
                arrived.set()

        async def consumer(index: int, name: str) -> None:
            channel = await connections[index // per_connection].channel()
            await channel.set_qos(prefetch_count=10)
            queue = await channel.declare_queue(name, durable=True)
            await queue.consume(on_message)

        started = time.perf_counter()
        for start in range(0, len(names), _OPENING):
            await asyncio.gather(
                *(
                    consumer(start + offset, name)
                    for offset, name in enumerate(names[start : start + _OPENING])
                )
            )
        opened = time.perf_counter() - started
        publisher = await connections[0].channel(publisher_confirms=True)
        work = iter(names)

        async def producer() -> None:
            for name in work:
                await publisher.default_exchange.publish(
                    aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=name,
                )

        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(min(100, len(names)))))
        async with asyncio.timeout(_RECEIVE_TIMEOUT):
            await arrived.wait()
        delivered = time.perf_counter() - started
        await publisher.close()
    finally:
        for conn in connections:
            await conn.close()
        async with await aio_pika.connect(AMQP_URL) as cleanup:
            await delete_queues(cleanup, names)
    return opened, delivered


async def bench_streams(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.streams)
    count = len(devices)
    # Quick: a few channels per connection, so the run still crosses connections.
    per_connection = PER_CONNECTION if not ctx.quick else max(2, count // 3)
    for _ in range(sizes.runs):
        aq_open, aq_delivered, used = await _amqp_queue(devices, per_connection)
        raw_open, raw_delivered = await _raw(devices, per_connection)
        results.record(
            "aq.streams.open",
            rate(count, aq_open),
            group=GROUP,
            label=f"amqp-queue: {count:,} consume() streams opened ({used} connections)",
            unit="streams/s",
        )
        results.record(
            "raw.streams.open",
            rate(count, raw_open),
            group=GROUP,
            label="bare aio-pika: queue declared and consumer started per device",
            unit="streams/s",
        )
        results.record(
            "aq.streams.delivered",
            rate(count, aq_delivered),
            group=GROUP,
            label="amqp-queue: one command enqueued to each device, until every stream has it",
            unit="msg/s",
        )
        results.record(
            "raw.streams.delivered",
            rate(count, raw_delivered),
            group=GROUP,
            label="bare aio-pika: one message published to each queue, until all arrived",
            unit="msg/s",
        )
    results.ratio("streams opened / bare consumers started", "aq.streams.open", "raw.streams.open")
    results.ratio(
        "enqueue-to-stream / bare publish-to-consumer",
        "aq.streams.delivered",
        "raw.streams.delivered",
    )
