"""Many devices: how fast queues come into being and what each costs the broker.

10,000 devices each get one pending command through amqp-queue (declare, bind, publish on
the first enqueue), against the same number of bare classic queues holding one message each.
Broker memory comes from ``rabbit_vm:memory()``, the breakdown ``rabbitmq-diagnostics
memory_breakdown`` prints (the management plugin is not enabled here), before and after, with
the queues in place, each reading taken right after a full garbage collection of the broker's
processes, for both sides (one ``rabbitmqctl eval``).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import aio_pika

from amqp_queue import RabbitMQConfig
from bench.harness import Better, Context, Target, rate
from bench.services import PAYLOAD, TTL, connection, delete_queues, device_ids, rabbitmq_store
from bench.services import unique as unique_name

GROUP = "Scale: 10,000 devices, one pending command each"
# Not memory in use by a category: the totals, and what is allocated or reserved but unused.
_NOT_IN_USE = {"reserved_unallocated", "allocated_unused", "erlang", "rss", "allocated"}
_SETTLE = 0.2
# Collects every broker process's garbage, then reads the broker's memory by category (what
# ``rabbitmq-diagnostics memory_breakdown`` reports), in one call.
_MEMORY_AFTER_GC = "[erlang:garbage_collect(P) || P <- erlang:processes()], rabbit_vm:memory()."
_CATEGORY = re.compile(rb"\{(\w+),(\d+)\}")


async def memory_categories(expression: str) -> dict[str, int]:
    """The ``{name, bytes}`` pairs in what ``rabbitmqctl eval expression`` prints (the
    categories of ``rabbit_vm:memory()``, with ``rss`` and the other totals)."""
    tool = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    process = await asyncio.create_subprocess_exec(
        tool,
        "eval",
        expression,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl eval failed: {err.decode(errors='replace')}")
    categories = {name.decode(): int(value) for name, value in _CATEGORY.findall(out)}
    if "queue_procs" not in categories:
        raise RuntimeError(f"unexpected rabbit_vm:memory() output: {out[:200]!r}")
    return categories


async def broker_memory() -> int:
    """Bytes the broker's memory categories hold after a full garbage collection (memory
    allocated but unused, or reserved, left out)."""
    categories = await memory_categories(_MEMORY_AFTER_GC)
    return sum(value for name, value in categories.items() if name not in _NOT_IN_USE)


async def _settled_memory() -> int:
    """Broker memory after a full garbage collection of every broker process.

    Without it a reading holds whatever garbage the last burst left (deltas of the same 10k
    queues drifted by a third between runs); with it they agree within a few percent.
    """
    await asyncio.sleep(_SETTLE)
    return await broker_memory()


async def _amqp_queue_devices(devices: list[str], producers: int) -> tuple[float, int]:
    """Seconds to give every device its first command, and the broker memory it took."""
    before = await _settled_memory()
    async with rabbitmq_store() as store:
        work = iter(devices)

        async def producer() -> None:
            for device in work:
                await store.enqueue(device, PAYLOAD, TTL)

        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(min(producers, len(devices)))))
        seconds = time.perf_counter() - started
        used = await _settled_memory() - before
    return seconds, used


async def _bare_queues(devices: list[str], producers: int) -> tuple[float, int]:
    """The same with bare classic queues: declare, publish one persistent message, over as
    many channels as amqp-queue declares on."""
    prefix = unique_name("bench.bare")
    names = [f"{prefix}.{device}" for device in devices]
    before = await _settled_memory()
    async with connection() as conn:
        channels = [
            await conn.channel(publisher_confirms=True)
            for _ in range(RabbitMQConfig().declare_channels)
        ]
        try:
            work = iter(enumerate(names))

            async def producer() -> None:
                for index, name in work:
                    channel = channels[index % len(channels)]
                    await channel.declare_queue(name, durable=True)
                    await channel.default_exchange.publish(
                        aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=name,
                    )

            started = time.perf_counter()
            await asyncio.gather(*(producer() for _ in range(min(producers, len(names)))))
            seconds = time.perf_counter() - started
            used = await _settled_memory() - before
        finally:
            await delete_queues(conn, names)
    return seconds, used


async def bench_scale(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.scale_devices)
    count = len(devices)
    producers = 100
    for _ in range(sizes.runs):
        aq_seconds, aq_bytes = await _amqp_queue_devices(devices, producers)
        bare_seconds, bare_bytes = await _bare_queues(devices, producers)
        for key, label, value, unit in (
            (
                "aq.scale.declare",
                "amqp-queue: first command to a new device (declare + bind + index + publish)",
                rate(count, aq_seconds),
                "devices/s",
            ),
            (
                "bare.scale.declare",
                "bare classic queue: declare + publish one message",
                rate(count, bare_seconds),
                "devices/s",
            ),
            (
                "aq.scale.memory",
                "amqp-queue: broker memory per device (queue, binding, one command)",
                aq_bytes / count / 1024,
                "KiB",
            ),
            (
                "bare.scale.memory",
                "bare classic queue with one message: broker memory per queue",
                bare_bytes / count / 1024,
                "KiB",
            ),
        ):
            better: Better = "lower" if unit == "KiB" else "higher"
            results.record(key, value, group=GROUP, label=label, unit=unit, better=better)
    results.ratio(
        "broker memory per device / bare classic queue",
        "aq.scale.memory",
        "bare.scale.memory",
        Target(1.1, "lower"),
    )
    results.ratio(
        "new-device rate / bare declare + publish", "aq.scale.declare", "bare.scale.declare"
    )
