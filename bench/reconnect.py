"""Reconnect storm: a whole fleet comes back at once after an outage, through one store.

2,000 devices each have 10 commands queued (written to the index a thousand per transaction
and published by the outbox relay, as after an outage). Then every device reconnects at the
same moment through ONE store, as a gateway process would: all 2,000 ``consume()`` streams
(or ``drain_pending`` calls) start together, each reads its 10 commands and ends. Timed from
the start until every command was handed out; every call must succeed and every command
arrive. The store's channel pool opens more connections by itself when one is full.

The raw building block reads the same backlog with bare aio-pika: the same exchange and
queue layout, 10 persistent messages per queue, one consumer on a channel of its own per
queue (acking each message; channel closed once its 10 arrived), as many channels on a
connection as the store puts on one (``RabbitMQConfig.channels_per_connection``), all started
at once.

A call that fails or a command that does not arrive is a failure of the benchmark (with
what the calls raised); warnings the client logged meanwhile are noted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from amqp_queue import RabbitMQConfig, RabbitMQStore
from bench import rawamqp
from bench.harness import Context, Target, rate
from bench.services import (
    AMQP_URL,
    PAYLOAD,
    TTL,
    delete_namespace,
    device_ids,
    rabbitmq_store,
)
from bench.services import unique as unique_name

GROUP = "Reconnect storm: every device at once through one store"
_TIMEOUT = 300.0
# Loggers whose warnings during a storm are evidence of a limit hit or a connection lost.
_WATCHED = ("amqp_queue", "aio_pika", "aiormq")


class _Warnings(logging.Handler):
    """Counts warnings and errors logged while a storm runs, and keeps the first few."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(f"{record.name}: {record.getMessage()[:200]}")


async def _fill(store: RabbitMQStore, devices: list[str], per_device: int) -> None:
    """``per_device`` commands for each device, in the index a thousand per transaction,
    then published by the relay (which declares the queues)."""
    slots = [device for _ in range(per_device) for device in devices]
    for start in range(0, len(slots), 1_000):
        chunk = slots[start : start + 1_000]
        records = [store.build(device, None, PAYLOAD, TTL) for device in chunk]
        await store.state.write(records, ())
    await store.relay_outbox()
    # Lets the relay's publish marks reach the index before timing.
    await asyncio.sleep(0.2)


async def _consume(store: RabbitMQStore, device: str, per_device: int) -> int:
    received = 0
    async with asyncio.timeout(_TIMEOUT), store.consume(device) as stream:
        async for _ in stream:
            received += 1
            if received == per_device:
                break
    return received


async def _drain(store: RabbitMQStore, device: str, per_device: int) -> int:
    async with asyncio.timeout(_TIMEOUT):
        return len(await store.drain_pending(device))


Reconnect = Callable[[RabbitMQStore, str, int], Awaitable[int]]
WAYS: dict[str, Reconnect] = {"consume": _consume, "drain": _drain}


@dataclass(frozen=True, slots=True)
class Storm:
    """What one storm through the store did."""

    seconds: float
    connections: int
    delivered: int
    failures: list[str]
    warnings: _Warnings


def _per_connection(ctx: Context, devices: list[str]) -> int:
    """Channels per connection, the store's and the raw side's alike. Quick: a few, so even
    a tiny storm crosses connections."""
    if ctx.quick:
        return max(2, len(devices) // 3)
    return RabbitMQConfig().channels_per_connection


async def _amqp_queue(ctx: Context, way: str, devices: list[str], per_device: int) -> Storm:
    per_connection = _per_connection(ctx, devices)
    watcher = _Warnings()
    async with rabbitmq_store(relay_after=0, channels_per_connection=per_connection) as store:
        await _fill(store, devices, per_device)
        for name in _WATCHED:
            logging.getLogger(name).addHandler(watcher)
        try:
            started = time.perf_counter()
            outcomes = await asyncio.gather(
                *(WAYS[way](store, device, per_device) for device in devices),
                return_exceptions=True,
            )
            seconds = time.perf_counter() - started
        finally:
            for name in _WATCHED:
                logging.getLogger(name).removeHandler(watcher)
        connections = store._channels.connections
    failures = [
        f"{type(exc).__name__}: {exc}" for exc in outcomes if isinstance(exc, BaseException)
    ]
    delivered = sum(outcome for outcome in outcomes if isinstance(outcome, int))
    return Storm(seconds, connections, delivered, failures, watcher)


def _report(ctx: Context, way: str, storm: Storm, devices: int, total: int) -> bool:
    """Notes what went wrong in a storm; whether every call succeeded and delivered all."""
    complete = not storm.failures and storm.delivered == total
    if storm.warnings.count:
        ctx.results.note(
            f"Reconnect storm by {way}: {storm.warnings.count} warnings logged, first: "
            + "; ".join(storm.warnings.first)
        )
    if not complete:
        kinds = sorted({failure[:200] for failure in storm.failures})
        ctx.results.failures.append(
            f"reconnect storm by {way}: {storm.delivered} of {total} commands delivered, "
            f"{len(storm.failures)} of {devices} calls failed after {storm.seconds:.0f} s "
            f"({storm.connections} connections); first errors: " + " | ".join(kinds[:3])
        )
    return complete


async def _raw_layout(conn: AbstractConnection, exchange: str, names: dict[str, str]) -> None:
    """The exchange and a bound durable queue per device, declared over a few channels."""
    channels = [await conn.channel() for _ in range(min(16, len(names)))]
    await channels[0].declare_exchange(exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    work = iter(names.items())

    async def declare(channel: AbstractChannel) -> None:
        for device, name in work:
            queue = await channel.declare_queue(name, durable=True)
            await queue.bind(exchange, routing_key=device)

    await asyncio.gather(*(declare(channel) for channel in channels))
    for channel in channels:
        await channel.close()


async def _raw(
    devices: list[str], per_device: int, in_flight: int, per_connection: int
) -> tuple[float, int]:
    """Seconds for bare consumers to read the same backlog, and the connections used."""
    exchange = unique_name("bench.storm")
    names = {device: RabbitMQConfig(exchange=exchange).queue_name(device) for device in devices}
    connections: list[AbstractConnection] = []
    try:
        async with await aio_pika.connect(AMQP_URL) as setup:
            await _raw_layout(setup, exchange, names)
            publisher = await setup.channel(publisher_confirms=True)
            target = await publisher.get_exchange(exchange, ensure=False)
            await rawamqp.publish_pipelined(target, devices, len(devices) * per_device, in_flight)
        for _ in range(math.ceil(len(devices) / per_connection)):
            connections.append(await aio_pika.connect(AMQP_URL))
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(
                _raw_consumer(connections[index // per_connection], names[device], per_device)
                for index, device in enumerate(devices)
            )
        )
        seconds = time.perf_counter() - started
        if sum(counts) != len(devices) * per_device:
            raise RuntimeError(f"raw storm read {sum(counts)} of {len(devices) * per_device}")
    finally:
        for conn in connections:
            await conn.close()
        await delete_namespace(exchange, names.values())
    return seconds, len(connections)


async def _raw_consumer(conn: AbstractConnection, name: str, per_device: int) -> int:
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=RabbitMQConfig().prefetch)
    queue = await channel.declare_queue(name, durable=True)
    done = asyncio.get_running_loop().create_future()
    received = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal received
        await message.ack()
        received += 1
        if received == per_device and not done.done():
            done.set_result(None)

    tag = await queue.consume(on_message)
    async with asyncio.timeout(_TIMEOUT):
        await done
    await queue.cancel(tag)
    await channel.close()
    return received


async def bench_reconnect(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.storm_devices)
    per_device = sizes.storm_commands
    total = len(devices) * per_device
    fleet = f"{len(devices):,} devices x {per_device}"
    for _ in range(sizes.runs):
        raw_seconds, raw_connections = await _raw(
            devices, per_device, sizes.in_flight, _per_connection(ctx, devices)
        )
        results.record(
            "raw.storm",
            rate(total, raw_seconds),
            group=GROUP,
            label=(
                f"bare aio-pika: {fleet}, a consumer and channel per queue, all at once "
                f"({raw_connections} connections)"
            ),
            unit="msg/s",
        )
        for way in WAYS:
            storm = await _amqp_queue(ctx, way, devices, per_device)
            if not _report(ctx, way, storm, len(devices), total):
                continue
            call = "consume()" if way == "consume" else "drain_pending()"
            results.record(
                f"aq.storm.{way}",
                rate(total, storm.seconds),
                group=GROUP,
                label=(
                    f"amqp-queue: {fleet}, every device's {call} at once through one store "
                    f"({storm.connections} connections)"
                ),
                unit="msg/s",
            )
    for way in WAYS:
        label = f"reconnect storm by {way} / bare consumers"
        results.ratio(label, f"aq.storm.{way}", "raw.storm", Target(0.6))
