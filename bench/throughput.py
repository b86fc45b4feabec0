"""Enqueue and delivery throughput against the raw broker doing the same with no index.

64-byte persistent messages with publisher confirms. Each run measures amqp-queue and the raw
baseline back to back, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from amqp_queue import RabbitMQStore
from bench import rawamqp
from bench.backends import state_url
from bench.harness import Context, Target, rate
from bench.services import (
    PAYLOAD,
    TTL,
    device_ids,
    rabbitmq_store,
    raw_namespace,
    sqlite_url,
    temp_dir,
)

GROUP_ENQUEUE = "Enqueue (persistent, confirmed)"
GROUP_DELIVERY = "Delivery"


async def enqueue_sequential(store: RabbitMQStore, devices: list[str], count: int) -> None:
    for _, device in zip(range(count), itertools.cycle(devices), strict=False):
        await store.enqueue(device, PAYLOAD, TTL)


async def enqueue_concurrent(
    store: RabbitMQStore, devices: list[str], count: int, producers: int
) -> None:
    """``producers`` tasks sharing ``count`` enqueues."""
    work = iter(zip(range(count), itertools.cycle(devices), strict=False))

    async def producer() -> None:
        for _, device in work:
            await store.enqueue(device, PAYLOAD, TTL)

    await asyncio.gather(*(producer() for _ in range(min(producers, count))))


async def fill(store: RabbitMQStore, device: str, count: int) -> None:
    """Queues ``count`` commands for a benchmark to deliver, fast: written to the index a
    thousand per transaction, then published by the outbox relay (as after an outage)."""
    for start in range(0, count, 1_000):
        chunk = min(1_000, count - start)
        records = [store.build(device, None, PAYLOAD, TTL) for _ in range(chunk)]
        await store.state.write(records, ())
    await store.relay_outbox()


async def settle() -> None:
    """Lets background index updates (published marks) of a fill finish before timing."""
    await asyncio.sleep(0.2)


async def bench_enqueue(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.devices)
    group = GROUP_ENQUEUE
    for _ in range(sizes.runs):
        async with raw_namespace(devices) as raw:
            started = time.perf_counter()
            await rawamqp.publish_sequential(raw.exchange, devices, sizes.seq_enqueue)
            seconds = time.perf_counter() - started
            results.record(
                "raw.publish.sequential",
                rate(sizes.seq_enqueue, seconds),
                group=group,
                label="raw aio-pika publish + confirm, sequential",
                unit="msg/s",
            )
            started = time.perf_counter()
            await rawamqp.publish_pipelined(
                raw.exchange, devices, sizes.conc_enqueue, sizes.in_flight
            )
            seconds = time.perf_counter() - started
            results.record(
                "raw.publish.pipelined",
                rate(sizes.conc_enqueue, seconds),
                group=group,
                label=f"raw aio-pika publish + confirm, {sizes.in_flight:,} in flight",
                unit="msg/s",
            )
        async with rabbitmq_store() as store:
            for device in devices:
                await store.ensure_queue(device)
            started = time.perf_counter()
            await enqueue_sequential(store, devices, sizes.seq_enqueue)
            seconds = time.perf_counter() - started
            results.record(
                "aq.enqueue.sequential",
                rate(sizes.seq_enqueue, seconds),
                group=group,
                label="amqp-queue enqueue, sequential (SQLite index, synchronous=FULL)",
                unit="msg/s",
            )
            await settle()
            started = time.perf_counter()
            await enqueue_concurrent(store, devices, sizes.conc_enqueue, sizes.producers)
            seconds = time.perf_counter() - started
            results.record(
                "aq.enqueue.concurrent",
                rate(sizes.conc_enqueue, seconds),
                group=group,
                label=f"amqp-queue enqueue, {sizes.producers:,} concurrent producers",
                unit="msg/s",
            )
        with temp_dir() as directory:
            normal = sqlite_url(directory) + "?synchronous=normal"
            async with rabbitmq_store(state_url=normal) as store:
                for device in devices:
                    await store.ensure_queue(device)
                started = time.perf_counter()
                await enqueue_sequential(store, devices, sizes.seq_enqueue)
                seconds = time.perf_counter() - started
                results.record(
                    "aq.enqueue.sequential.normal",
                    rate(sizes.seq_enqueue, seconds),
                    group=group,
                    label=(
                        "amqp-queue enqueue, sequential, opt-in synchronous=NORMAL "
                        "(no fsync per commit: not power-loss safe)"
                    ),
                    unit="msg/s",
                )
    results.ratio(
        "concurrent enqueue / raw pipelined publish",
        "aq.enqueue.concurrent",
        "raw.publish.pipelined",
        Target(0.60),
    )
    results.ratio(
        "sequential enqueue / raw sequential publish",
        "aq.enqueue.sequential",
        "raw.publish.sequential",
        Target(0.70),
    )
    results.ratio(
        "sequential enqueue, opt-in synchronous=NORMAL / raw sequential publish",
        "aq.enqueue.sequential.normal",
        "raw.publish.sequential",
        Target(0.70),
    )


async def bench_delivery(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    device = "dev-drain"
    count = sizes.drain
    group = GROUP_DELIVERY
    for _ in range(sizes.runs):
        async with raw_namespace([device]) as raw:
            await rawamqp.publish_pipelined(raw.exchange, [device], count, sizes.in_flight)
            reader = await raw.connection.channel()
            started = time.perf_counter()
            await rawamqp.consume(reader, raw.queue_name(device), count, sizes.prefetch)
            seconds = time.perf_counter() - started
            await reader.close()
            results.record(
                "raw.consume",
                rate(count, seconds),
                group=group,
                label=f"raw aio-pika consumer, prefetch {sizes.prefetch:,}, ack each",
                unit="msg/s",
            )
        for kind in DELIVERY_STATES:
            await deliver(ctx, device, count, kind)
    for kind, target in DELIVERY_STATES.items():
        on = "" if kind == "sqlite" else f" ({kind} state)"
        results.ratio(
            f"drain_pending / raw consumer{on}", _key("drain", kind), "raw.consume", target
        )
        results.ratio(f"consume / raw consumer{on}", _key("consume", kind), "raw.consume", target)


# The state backends delivery is measured on, with each one's target against the raw
# consumer (Redis is reported, with no target of its own).
DELIVERY_STATES: dict[str, Target | None] = {
    "sqlite": Target(0.70),
    "postgres": Target(0.60),
    "redis": None,
}


def _key(what: str, kind: str) -> str:
    # The SQLite rows keep the names earlier runs recorded them under.
    return f"aq.{what}" if kind == "sqlite" else f"aq.{what}.{kind}"


async def deliver(ctx: Context, device: str, count: int, kind: str) -> None:
    """Drains, then consumes, a backlog of ``count`` commands on ``kind`` state."""
    results, sizes = ctx.results, ctx.sizes
    on = "" if kind == "sqlite" else f", {kind} state"
    # relay_after=0: the relay publishes what fill() wrote behind the store's back at
    # once, as it would an older outage's backlog.
    async with (
        state_url(kind) as url,
        rabbitmq_store(state_url=url, prefetch=sizes.prefetch, relay_after=0) as store,
    ):
        await fill(store, device, count)
        started = time.perf_counter()
        drained = await store.drain_pending(device)
        seconds = time.perf_counter() - started
        if len(drained) != count:
            raise RuntimeError(f"drain returned {len(drained)} of {count} commands")
        results.record(
            _key("drain", kind),
            rate(count, seconds),
            group=GROUP_DELIVERY,
            label=f"amqp-queue drain_pending of {count:,} queued commands{on}",
            unit="msg/s",
        )
        await fill(store, device, count)
        started = time.perf_counter()
        received = 0
        async with store.consume(device) as stream:
            async for _ in stream:
                received += 1
                if received == count:
                    break
        seconds = time.perf_counter() - started
        results.record(
            _key("consume", kind),
            rate(count, seconds),
            group=GROUP_DELIVERY,
            label=f"amqp-queue consume of {count:,} queued commands{on}",
            unit="msg/s",
        )
