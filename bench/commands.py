"""Confirmation and latest-intent-wins under load: the index-heavy operations."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

from amqp_queue import RabbitMQStore
from bench.harness import Context, rate
from bench.services import PAYLOAD, TTL, device_ids, rabbitmq_store

GROUP = "Confirmation and replacement"


async def _awaiting(store: RabbitMQStore, devices: list[str], count: int) -> list[str]:
    """``count`` commands awaiting confirmation, spread over devices with distinct types,
    written to the index in one transaction (nothing is published before a confirm)."""
    slots = zip(range(count), itertools.cycle(devices), strict=False)
    records = [
        store.build(device, f"type-{index}", PAYLOAD, TTL, requires_confirmation=True)
        for index, device in slots
    ]
    await store.state.write(records, ())
    return [record.id for record in records]


async def _confirm_all(store: RabbitMQStore, ids: list[str], workers: int) -> None:
    todo = iter(ids)

    async def worker() -> None:
        for command_id in todo:
            await store.confirm_command(command_id)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def bench_confirm(ctx: Context) -> None:
    """Confirms of commands awaiting an operator: each one publishes the command."""
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.devices)
    count = sizes.confirm
    for _ in range(sizes.runs):
        async with rabbitmq_store() as store:
            for workers, key, label in (
                (1, "aq.confirm.sequential", "sequential"),
                (100, "aq.confirm.concurrent", "100 concurrent operators"),
            ):
                ids = await _awaiting(store, devices, count)
                started = time.perf_counter()
                await _confirm_all(store, ids, workers)
                seconds = time.perf_counter() - started
                results.record(
                    key,
                    rate(count, seconds),
                    group=GROUP,
                    label=f"confirm {count:,} awaiting commands, {label}",
                    unit="cmd/s",
                )
                for device in devices:
                    await store.drain_pending(device)


async def bench_storm(ctx: Context) -> None:
    """enqueue_or_update storms on few types: most commands are superseded before delivery."""
    sizes, results = ctx.sizes, ctx.results
    device = "dev-storm"
    types = [f"setpoint-{index}" for index in range(sizes.storm_types)]
    count = sizes.storm
    for _ in range(sizes.runs):
        async with rabbitmq_store(prefetch=sizes.prefetch) as store:
            work = iter(zip(range(count), itertools.cycle(types), strict=False))

            async def producer(work: Iterator[tuple[int, str]]) -> None:
                for index, kind in work:
                    await store.enqueue_or_update(device, kind, index.to_bytes(8, "big"), TTL)

            started = time.perf_counter()
            await asyncio.gather(*(producer(work) for _ in range(min(sizes.producers, count))))
            seconds = time.perf_counter() - started
            results.record(
                "aq.storm.enqueue",
                rate(count, seconds),
                group=GROUP,
                label=(
                    f"enqueue_or_update storm: {count:,} on {len(types)} types, "
                    f"{sizes.producers:,} producers"
                ),
                unit="cmd/s",
            )
            started = time.perf_counter()
            delivered = await store.drain_pending(device)
            seconds = time.perf_counter() - started
            if len(delivered) != len(types):
                raise RuntimeError(f"storm delivered {len(delivered)} commands, not one per type")
            results.record(
                "aq.storm.drain",
                rate(count, seconds),
                group=GROUP,
                label=f"drain after the storm ({count:,} queued, {len(types)} live)",
                unit="msg/s",
            )
