"""Fleet scale: 100,000 devices with one pending command each, beside 10,000 in the same run.

For each fleet size, through one RabbitMQStore on SQLite state (the default): how fast the
devices get their first command (declare, bind, index, publish; 100 producers), what the
broker holds per device as a user sees it (the broker's resident memory, ``rss`` of
``rabbit_vm:memory()``, before any collection) and after a full garbage collection (see
:mod:`bench.scale`), the index's latencies with the whole fleet in it (``get_pending`` of a
device, ``get_status`` of a command), and how fast ``retire_device`` takes the fleet away
(cancel its commands, delete its queue). The cost per device must stay flat from the small
fleet to the large one (ratios ≤ 1.2).

Beside each fleet, the same with bare aio-pika on the same broker: a durable queue bound to
a direct exchange and one persistent message for each device (the same 100 workers, over as
many channels as the store declares on), then every queue deleted. Its delete rate tells
how much of a retire's cost, and of its growth with the fleet, is the broker's own.

Opt-in (``make bench-scale``, or ``--only fleet-scale``): it runs for several minutes and
holds up to 100,000 queues on the broker while it does.
"""

from __future__ import annotations

import asyncio
import functools
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable

import aio_pika

from amqp_queue import RabbitMQConfig
from bench.harness import Better, Context, Target, rate
from bench.scale import _settled_memory, broker_memory, memory_categories
from bench.services import PAYLOAD, TTL, connection, device_ids, rabbitmq_store, unique

GROUP = "Fleet scale: one pending command per device"
PRODUCERS = 100
SAMPLE = 200
# Not a slice of what is in use: the broker process's resident size as the OS counts it.
_RSS = "rabbit_vm:memory()."


async def broker_rss() -> int:
    """The broker's resident memory as the OS reports it, with whatever garbage it holds."""
    return (await memory_categories(_RSS))["rss"]


async def _each(items: Iterable[str], call: Callable[[str], Awaitable[object]]) -> float:
    """Seconds ``PRODUCERS`` tasks take to run ``call`` on every item."""
    work = iter(items)

    async def worker() -> None:
        for item in work:
            await call(item)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(PRODUCERS)))
    return time.perf_counter() - started


async def _latency_ms(calls: list[Callable[[], Awaitable[object]]]) -> tuple[float, float]:
    """Median and 99th percentile, in ms, of these calls made one after the other."""
    seconds = []
    for call in calls:
        started = time.perf_counter()
        await call()
        seconds.append(time.perf_counter() - started)
    cuts = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else seconds * 99
    return statistics.median(seconds) * 1000, cuts[98] * 1000


async def _bare_fleet(count: int) -> tuple[float, float]:
    """Seconds to give ``count`` bare queues their first message (declare, bind, publish
    with a confirm) and to delete them again, each with ``PRODUCERS`` workers."""
    devices = device_ids(count)
    name = unique("bench.bare-fleet")
    names = RabbitMQConfig(exchange=name)
    spread = RabbitMQConfig().declare_channels
    async with connection() as conn:
        channels = [await conn.channel(publisher_confirms=True) for _ in range(spread)]
        exchange = await channels[0].declare_exchange(
            name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        turn = iter(range(2 * count))

        async def first_message(device: str) -> None:
            channel = channels[next(turn) % spread]
            queue = await channel.declare_queue(names.queue_name(device), durable=True)
            await queue.bind(name, routing_key=device)
            message = aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=device)

        async def delete(device: str) -> None:
            await channels[next(turn) % spread].queue_delete(names.queue_name(device))

        try:
            declare = await _each(devices, first_message)
        finally:
            # Deleted also when the run fails half way: no queues left on the broker.
            deleted = await _each(devices, delete)
            await channels[0].exchange_delete(name)
    return declare, deleted


async def _one_fleet(ctx: Context, count: int) -> None:
    devices = device_ids(count)
    name = f"{count // 1000}k" if count >= 1000 else str(count)
    results = ctx.results
    rss_before = await broker_rss()
    gc_before = await _settled_memory()
    async with rabbitmq_store() as store:
        ids: dict[str, str] = {}

        async def first_command(device: str) -> None:
            ids[device] = await store.enqueue(device, PAYLOAD, TTL)

        declare = await _each(devices, first_command)
        rss = await broker_rss() - rss_before
        collected = await _settled_memory() - gc_before
        sample = random.Random(count).sample(devices, min(SAMPLE, count))
        pending = await _latency_ms([functools.partial(store.get_pending, d) for d in sample])
        status = await _latency_ms([functools.partial(store.get_status, ids[d]) for d in sample])
        retire = await _each(devices, store.retire_device)
        after_retire = await broker_memory()
    bare_declare, bare_delete = await _bare_fleet(count)
    for key, label, value, unit in (
        (
            f"fleet.{name}.declare",
            f"{name}: first command to a new device",
            rate(count, declare),
            "devices/s",
        ),
        (
            f"fleet.{name}.rss",
            f"{name}: broker resident memory per device (no collection)",
            rss / count / 1024,
            "KiB",
        ),
        (
            f"fleet.{name}.memory",
            f"{name}: broker memory per device after a full GC",
            collected / count / 1024,
            "KiB",
        ),
        (
            f"fleet.{name}.pending_p50",
            f"{name}: get_pending of one device, median",
            pending[0],
            "ms",
        ),
        (f"fleet.{name}.pending_p99", f"{name}: get_pending of one device, p99", pending[1], "ms"),
        (f"fleet.{name}.status_p50", f"{name}: get_status of one command, median", status[0], "ms"),
        (
            f"fleet.{name}.retire",
            f"{name}: retire_device (cancel, delete the queue)",
            rate(count, retire),
            "devices/s",
        ),
        (
            f"fleet.{name}.bare_declare",
            f"{name}: bare aio-pika, first message to a new queue (declare, bind, publish)",
            rate(count, bare_declare),
            "devices/s",
        ),
        (
            f"fleet.{name}.bare_delete",
            f"{name}: bare aio-pika, queue.delete",
            rate(count, bare_delete),
            "devices/s",
        ),
    ):
        better: Better = "higher" if unit == "devices/s" else "lower"
        results.record(key, value, group=GROUP, label=label, unit=unit, better=better)
    results.note(
        f"Fleet scale {name}: after retiring every device the broker's memory (after a full "
        f"GC) was {(after_retire - gc_before) / 2**20:+.1f} MiB from before the run."
    )


async def bench_fleet_scale(ctx: Context) -> None:
    small, large = ctx.sizes.fleet_scale
    for _ in range(ctx.sizes.runs):
        await _one_fleet(ctx, small)
        await _one_fleet(ctx, large)
    s = f"{small // 1000}k" if small >= 1000 else str(small)
    big = f"{large // 1000}k" if large >= 1000 else str(large)
    for what in ("memory", "rss", "pending_p50"):
        ctx.results.ratio(
            f"{what} per device, {big} / {s}",
            f"fleet.{big}.{what}",
            f"fleet.{s}.{what}",
            Target(1.2, "lower"),
        )
    ctx.results.ratio(
        f"first-command rate, {s} / {big} (cost per device, flat)",
        f"fleet.{s}.declare",
        f"fleet.{big}.declare",
        Target(1.2, "lower"),
    )
    ctx.results.ratio(
        f"retire rate, {s} / {big} (cost per device, flat)",
        f"fleet.{s}.retire",
        f"fleet.{big}.retire",
        Target(1.2, "lower"),
    )
    # The broker's own part: how its queue deletion alone slows with the fleet, and how a
    # retire compares with a bare delete at each size.
    ctx.results.ratio(
        f"bare queue.delete rate, {s} / {big} (the broker's own growth)",
        f"fleet.{s}.bare_delete",
        f"fleet.{big}.bare_delete",
    )
    for size in (s, big):
        ctx.results.ratio(
            f"retire rate / bare queue.delete rate, {size}",
            f"fleet.{size}.retire",
            f"fleet.{size}.bare_delete",
        )
