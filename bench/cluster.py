"""The three-node cluster: quorum vs classic device queues, each against raw aio-pika.

``python -m bench --only cluster`` (not in ``--quick``: it starts a local cluster of its own,
scripts/cluster.sh, 20-35 s, and removes it after). Everything goes through the first node
(so the queues are led there and replicated to the other two for quorum queues); the raw
baselines publish to and consume from queues of the same type in the same run, so each ratio
compares like with like. Run it beside ``--only enqueue --only delivery`` for the single-node
figures of the same run.

Memory per device: N devices each get one pending command through amqp-queue (declare, bind,
publish); the cluster's memory is read before and after on all three nodes: as a user sees it
(``erlang:memory(total)``, what ``rabbitmqctl status`` reports as the VM's total), and the
in-use categories of ``rabbit_vm:memory()`` (``rabbitmq-diagnostics memory_breakdown``) right
after a full garbage collection. Disk: the nodes' data directories, before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange

from amqp_queue import QueueType, RabbitMQConfig, RabbitMQStore
from bench.harness import Better, Context, rate
from bench.services import (
    BENCH_LIMITS,
    PAYLOAD,
    TTL,
    device_ids,
    sqlite_url,
    temp_dir,
    unique,
)

GROUP = "Cluster (3 nodes, local): {}"
_NOT_IN_USE = {"reserved_unallocated", "allocated_unused", "erlang", "rss", "allocated", "total"}
_CATEGORY = re.compile(r"\{(\w+),(\d+)\}")
DEVICES = 2_000
"""Devices in the memory figure. A quorum queue holds about five file handles on each node;
the private nodes run with the machine's hard open-file limit (scripts/rabbit-node.sh), so
2,000 (10,000 handles a node) fit where, at the 1,024 a su session gives, some 300 did."""
RATIOS = (
    ("concurrent enqueue / raw pipelined publish", "aq.concurrent", "raw.pipelined"),
    ("sequential enqueue / raw sequential publish", "aq.sequential", "raw.sequential"),
    ("consume / raw consumer", "aq.consume", "raw.consume"),
)
_GC = "[erlang:garbage_collect(P) || P <- erlang:processes()], "


def _arguments(queue_type: QueueType) -> dict[str, Any]:
    return {"x-queue-type": queue_type.value}


@asynccontextmanager
async def _raw(
    url: str, devices: list[str], queue_type: QueueType
) -> AsyncIterator[tuple[AbstractConnection, AbstractExchange, list[str]]]:
    """A direct exchange and one durable queue of ``queue_type`` per device."""
    name = unique("bench.raw")
    names = RabbitMQConfig(exchange=name)
    queues = [names.queue_name(device) for device in devices]
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
        try:
            for device, queue_name in zip(devices, queues, strict=True):
                queue = await channel.declare_queue(
                    queue_name, durable=True, arguments=_arguments(queue_type)
                )
                await queue.bind(exchange, routing_key=device)
            yield connection, exchange, queues
        finally:
            cleanup = await connection.channel()
            for queue_name in queues:
                await cleanup.queue_delete(queue_name)
            await cleanup.exchange_delete(name)


async def _publish_pipelined(
    exchange: AbstractExchange, devices: list[str], count: int, in_flight: int
) -> None:
    targets = iter(zip(range(count), itertools.cycle(devices), strict=False))

    async def publisher() -> None:
        for _, device in targets:
            message = aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=device)

    await asyncio.gather(*(publisher() for _ in range(min(in_flight, count))))


async def _publish_sequential(exchange: AbstractExchange, devices: list[str], count: int) -> None:
    for _, device in zip(range(count), itertools.cycle(devices), strict=False):
        message = aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await exchange.publish(message, routing_key=device)


async def _raw_consume(
    connection: AbstractConnection, queue: str, count: int, prefetch: int
) -> None:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    done = asyncio.get_running_loop().create_future()
    received = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal received
        await message.ack()
        received += 1
        if received == count and not done.done():
            done.set_result(None)

    declared = await channel.get_queue(queue, ensure=False)
    tag = await declared.consume(on_message)
    try:
        await done
    finally:
        await declared.cancel(tag)
        await channel.close()


@asynccontextmanager
async def _store(url: str, queue_type: QueueType, **config: Any) -> AsyncIterator[RabbitMQStore]:
    exchange = unique("bench.aq")
    with temp_dir() as directory:
        store = await RabbitMQStore.connect(
            url,
            state_url=sqlite_url(directory),
            config=RabbitMQConfig(
                exchange=exchange, queue_type=queue_type, limits=BENCH_LIMITS, **config
            ),
        )
        try:
            async with store:
                yield store
        finally:
            # Bounded: a cluster that stopped answering must fail the benchmark, not hang it.
            connection = await aio_pika.connect(url, timeout=30)
            async with connection:
                channel = await connection.channel()
                for device in store.declared_devices:
                    await channel.queue_delete(store.config.queue_name(device))
                await channel.exchange_delete(exchange)


async def _throughput(ctx: Context, url: str, queue_type: QueueType) -> None:
    sizes, results = ctx.sizes, ctx.results
    kind = queue_type.value
    group = GROUP.format(f"{kind} device queues")
    devices = device_ids(sizes.devices)
    seq, conc, drain = sizes.seq_enqueue, sizes.conc_enqueue, sizes.drain

    def record(key: str, count: int, seconds: float, label: str) -> None:
        results.record(
            f"cluster.{kind}.{key}", rate(count, seconds), group=group, label=label, unit="msg/s"
        )

    async with _raw(url, devices, queue_type) as (connection, exchange, queues):
        started = time.perf_counter()
        await _publish_sequential(exchange, devices, seq)
        record(
            "raw.sequential",
            seq,
            time.perf_counter() - started,
            "raw aio-pika publish + confirm, sequential",
        )
        started = time.perf_counter()
        await _publish_pipelined(exchange, devices, conc, sizes.in_flight)
        record(
            "raw.pipelined",
            conc,
            time.perf_counter() - started,
            f"raw aio-pika publish + confirm, {sizes.in_flight:,} in flight",
        )
        for queue in queues:  # empty them for the consume figure
            channel = await connection.channel()
            await (await channel.get_queue(queue, ensure=False)).purge()
            await channel.close()
        await _publish_pipelined(exchange, devices[:1], drain, sizes.in_flight)
        started = time.perf_counter()
        await _raw_consume(connection, queues[0], drain, sizes.prefetch)
        record(
            "raw.consume",
            drain,
            time.perf_counter() - started,
            f"raw aio-pika consumer, prefetch {sizes.prefetch:,}, ack each",
        )

    async with _store(url, queue_type, prefetch=sizes.prefetch, relay_after=0) as store:
        for device in devices:
            await store.ensure_queue(device)
        started = time.perf_counter()
        for _, device in zip(range(seq), itertools.cycle(devices), strict=False):
            await store.enqueue(device, PAYLOAD, TTL)
        record(
            "aq.sequential",
            seq,
            time.perf_counter() - started,
            "amqp-queue enqueue, sequential (SQLite index)",
        )
        await asyncio.sleep(0.2)
        work = iter(zip(range(conc), itertools.cycle(devices), strict=False))

        async def producer() -> None:
            for _, device in work:
                await store.enqueue(device, PAYLOAD, TTL)

        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(min(sizes.producers, conc))))
        record(
            "aq.concurrent",
            conc,
            time.perf_counter() - started,
            f"amqp-queue enqueue, {sizes.producers:,} concurrent producers",
        )
        # Delivery: a backlog written to the index and relayed (as after an outage), consumed.
        device = "dev-consume"
        for start in range(0, drain, 1_000):
            records = [
                store.build(device, None, PAYLOAD, TTL) for _ in range(min(1_000, drain - start))
            ]
            await store.state.write(records, ())
        await store.relay_outbox()
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        received = 0
        async with store.consume(device) as stream:
            async for _ in stream:
                received += 1
                if received == drain:
                    break
        record(
            "aq.consume",
            drain,
            time.perf_counter() - started,
            f"amqp-queue consume of {drain:,} queued commands",
        )


async def _memory(cluster: Any) -> tuple[int, int]:
    """(bytes as a user sees them, in-use bytes after a full GC), summed over the nodes."""
    seen = used = 0
    for node in cluster.nodes:
        total = await cluster.run("ctl", node, "-q", "eval", "erlang:memory(total).")
        seen += int(total.strip())
        breakdown = await cluster.run("ctl", node, "-q", "eval", _GC + "rabbit_vm:memory().")
        categories = {name: int(value) for name, value in _CATEGORY.findall(breakdown)}
        used += sum(value for name, value in categories.items() if name not in _NOT_IN_USE)
    return seen, used


def _disk(cluster: Any) -> int:
    base = Path(cluster.env["AMQP_QUEUE_CLUSTER_DIR"])
    total = 0
    for root, _, files in os.walk(base):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


async def _memory_per_device(ctx: Context, cluster: Any, queue_type: QueueType) -> None:
    results = ctx.results
    count = 20 if ctx.quick else DEVICES
    kind = queue_type.value
    group = GROUP.format(f"broker memory per device, {count:,} devices, one command each")
    devices = device_ids(count)
    await asyncio.sleep(1.0)
    seen_before, used_before = await _memory(cluster)
    disk_before = await asyncio.to_thread(_disk, cluster)
    async with _store(cluster.urls[0], queue_type) as store:
        work = iter(devices)

        async def producer() -> None:
            for device in work:
                await store.enqueue(device, PAYLOAD, TTL)

        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(min(100, count))))
        seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)
        seen_after, used_after = await _memory(cluster)
        disk_after = await asyncio.to_thread(_disk, cluster)
        # Recorded before the clean-up, which may fail on a cluster in trouble.
        figures: tuple[tuple[str, str, float, str, Better], ...] = (
            (
                "declare",
                f"{kind}: first command to a new device (declare + bind + index + publish)",
                rate(count, seconds),
                "devices/s",
                "higher",
            ),
            (
                "memory.seen",
                f"{kind}: memory per device, 3 nodes, as seen (erlang:memory(total))",
                (seen_after - seen_before) / count / 1024,
                "KiB",
                "lower",
            ),
            (
                "memory.gc",
                f"{kind}: memory per device, 3 nodes, in use after a full GC",
                (used_after - used_before) / count / 1024,
                "KiB",
                "lower",
            ),
            (
                "disk",
                f"{kind}: disk per device, 3 nodes' data directories",
                (disk_after - disk_before) / count / 1024,
                "KiB",
                "lower",
            ),
        )
        for key, label, value, unit, better in figures:
            results.record(
                f"cluster.{kind}.{key}", value, group=group, label=label, unit=unit, better=better
            )


async def bench_cluster(ctx: Context) -> None:
    from tests.faults.cluster import local_cluster  # the suite's cluster helper

    for queue_type in (QueueType.CLASSIC, QueueType.QUORUM):
        kind = queue_type.value
        for label, top, bottom in RATIOS:
            ctx.results.ratio(
                f"cluster, {kind}: {label}", f"cluster.{kind}.{top}", f"cluster.{kind}.{bottom}"
            )
    ctx.results.ratio(
        "cluster: quorum / classic memory per device (after GC)",
        "cluster.quorum.memory.gc",
        "cluster.classic.memory.gc",
    )
    ctx.results.ratio(
        "cluster: quorum / classic concurrent enqueue",
        "cluster.quorum.aq.concurrent",
        "cluster.classic.aq.concurrent",
    )
    started = time.perf_counter()
    async with local_cluster() as cluster:
        ctx.results.note(
            f"cluster: a local three-node cluster (scripts/cluster.sh) started in "
            f"{time.perf_counter() - started:.0f} s, on the same 2-core machine as everything else"
        )
        for _ in range(ctx.sizes.runs):
            for queue_type in (QueueType.CLASSIC, QueueType.QUORUM):
                await _throughput(ctx, cluster.urls[0], queue_type)
        for _ in range(ctx.sizes.runs):
            for queue_type in (QueueType.CLASSIC, QueueType.QUORUM):
                await _memory_per_device(ctx, cluster, queue_type)
