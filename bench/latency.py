"""End-to-end latency with the device online: a command from ``enqueue`` to the loop body.

A ``consume()`` stream is open on the device. Commands are enqueued one at a time; each is
timed from the ``enqueue`` call to the stream's loop body receiving it, and the next is
enqueued only once both the call has returned and the body has it. The raw building block
does the same with bare aio-pika: a confirmed persistent publish to the device's queue (its
exchange, its binding), timed from the publish call to a consumer callback on another
channel of the same connection, which acks. Both sides report the run's p50 and p99.

The clock starts at the call, not at its return: the broker hands a message to a waiting
consumer before it confirms the publish, so the body usually has the command before
``enqueue`` (or the raw publish) returns. How often it does is recorded too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from amqp_queue import PendingCommand, RabbitMQStore
from amqp_queue.stream import CommandStream
from bench.backends import state_url
from bench.harness import Context, Target, percentile
from bench.services import PAYLOAD, TTL, rabbitmq_store, raw_namespace

GROUP = "End-to-end latency, device online (enqueue call → loop body)"
STATES = ("sqlite", "postgres")
_DEVICE = "dev-latency"
# Commands sent before timing: queue declared, channels and caches warm.
_WARM_UP = 20
_TIMEOUT = 30.0


@dataclass(slots=True)
class Samples:
    """Per command: seconds from the call to the body, and whether the body had it first."""

    latencies: list[float]
    before_return: int


def _payload(index: int) -> bytes:
    return index.to_bytes(8, "big") + PAYLOAD[8:]


async def _amqp_queue(store: RabbitMQStore, count: int) -> Samples:
    await store.ensure_queue(_DEVICE)
    async with store.consume(_DEVICE) as stream:
        arrivals: asyncio.Queue[tuple[float, PendingCommand]] = asyncio.Queue()
        reader = asyncio.create_task(_read(stream, arrivals))
        try:
            await _sequence(store, arrivals, _WARM_UP)
            return await _sequence(store, arrivals, count)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def _read(
    stream: CommandStream, arrivals: asyncio.Queue[tuple[float, PendingCommand]]
) -> None:
    async for command in stream:
        arrivals.put_nowait((time.perf_counter(), command))


async def _sequence(
    store: RabbitMQStore, arrivals: asyncio.Queue[tuple[float, PendingCommand]], count: int
) -> Samples:
    samples = Samples([], 0)
    for index in range(count):
        payload = _payload(index)
        started = time.perf_counter()
        await store.enqueue(_DEVICE, payload, TTL)
        returned = time.perf_counter()
        async with asyncio.timeout(_TIMEOUT):
            arrived, command = await arrivals.get()
        if command.payload != payload:
            raise RuntimeError(f"command {index} arrived out of order or was lost")
        samples.latencies.append(arrived - started)
        samples.before_return += arrived <= returned
    return samples


async def _raw(count: int) -> Samples:
    async with raw_namespace([_DEVICE]) as raw:
        reader = await raw.connection.channel()
        await reader.set_qos(prefetch_count=1_000)
        queue = await reader.declare_queue(raw.queue_name(_DEVICE), durable=True)
        arrivals: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            arrivals.put_nowait((time.perf_counter(), message.body))
            await message.ack()

        await queue.consume(on_message)
        try:
            for total in (_WARM_UP, count):
                samples = Samples([], 0)
                for index in range(total):
                    payload = _payload(index)
                    message = aio_pika.Message(
                        payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    )
                    started = time.perf_counter()
                    await raw.exchange.publish(message, routing_key=_DEVICE)
                    returned = time.perf_counter()
                    async with asyncio.timeout(_TIMEOUT):
                        arrived, body = await arrivals.get()
                    if body != payload:
                        raise RuntimeError(f"raw message {index} arrived out of order")
                    samples.latencies.append(arrived - started)
                    samples.before_return += arrived <= returned
            return samples
        finally:
            await reader.close()


def _record(ctx: Context, key: str, label: str, samples: Samples) -> None:
    results = ctx.results
    count = len(samples.latencies)
    for name, fraction in (("p50", 0.50), ("p99", 0.99)):
        results.record(
            f"{key}.{name}",
            percentile(samples.latencies, fraction) * 1e6,
            group=GROUP,
            label=f"{label}, {name} of {count:,}",
            unit="µs",
            better="lower",
        )
    results.record(
        f"{key}.first",
        100.0 * samples.before_return / count,
        group=GROUP,
        label=f"{label}: delivered before the call returned",
        unit="%",
    )


async def bench_latency(ctx: Context) -> None:
    count = ctx.sizes.latency
    for _ in range(ctx.sizes.runs):
        _record(ctx, "raw.latency", "raw aio-pika publish + confirm → consumer", await _raw(count))
        for kind in STATES:
            async with state_url(kind) as url, rabbitmq_store(state_url=url) as store:
                samples = await _amqp_queue(store, count)
            _record(ctx, f"aq.latency.{kind}", f"amqp-queue enqueue → consume(), {kind}", samples)
    for kind in STATES:
        for name, bound in (("p50", 1.5), ("p99", 2.0)):
            ctx.results.ratio(
                f"latency {name}, enqueue → consume() ({kind}) / raw publish → consumer",
                f"aq.latency.{kind}.{name}",
                f"raw.latency.{name}",
                Target(bound, "lower"),
            )
