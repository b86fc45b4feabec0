"""Fleet operations: fan-out of one command to many devices, and a rollout's summary.

Fan-out: one ``enqueue_many`` of a command to 10,000 devices whose queues exist (declared
first, untimed), side by side in the same run with raw aio-pika publishing of 10,000
persistent messages to 10,000 queues of their own, pipelined with publisher confirms. Both
sides end when the broker confirmed every message (what ``enqueue_many`` left to the outbox
relay after a publish timeout is flushed by the relay inside the timed span); amqp-queue
also wrote the 10,000 index rows in one transaction before publishing.

Summary: ``rollout_summary`` of a rollout of 100,000 commands (one per device) on SQLite and
PostgreSQL. The rollout is written through the state's own write path (``enqueue_many`` of
the index, no broker); then half of it is marked delivered and a few hundred get outcomes,
so the counts span several statuses.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from amqp_queue import BrokerError, RabbitMQStore
from amqp_queue.state import SqlStore
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.validation import Limits
from bench.backends import postgres_state
from bench.harness import Context, Target, rate
from bench.rawamqp import publish_pipelined
from bench.services import PAYLOAD, TTL, device_ids, rabbitmq_store, raw_namespace, temp_dir

FANOUT = "Fleet: fan-out of one command to many devices"
SUMMARY = "Fleet: rollout summary"
SUMMARY_TARGET_MS = 50.0
_CHUNK = 1_000


async def _fanout(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.fanout)
    count = len(devices)
    async with rabbitmq_store() as store, raw_namespace(devices) as raw:
        # Untimed: the queues exist before either side is timed (the raw side's are
        # declared by raw_namespace).
        for start in range(0, count, _CHUNK):
            await asyncio.gather(*(store.ensure_queue(d) for d in devices[start : start + _CHUNK]))
        for _ in range(sizes.runs):
            started = time.perf_counter()
            rollout = await store.enqueue_many(devices, PAYLOAD, TTL)
            returned = time.perf_counter() - started
            owed = await _confirmed_by_broker(store)
            ours = time.perf_counter() - started
            if len(rollout.command_ids) != count:
                raise RuntimeError(f"enqueue_many wrote {len(rollout.command_ids)} commands")
            started = time.perf_counter()
            await publish_pipelined(raw.exchange, devices, count, sizes.in_flight)
            theirs = time.perf_counter() - started
            results.record(
                "fleet.fanout.aq",
                rate(count, ours),
                group=FANOUT,
                label=f"amqp-queue: enqueue_many to {count:,} devices (index + publish)",
                unit="commands/s",
            )
            results.record(
                "fleet.fanout.raw",
                rate(count, theirs),
                group=FANOUT,
                label=f"raw aio-pika: {count:,} persistent messages to {count:,} queues, "
                f"{sizes.in_flight} in flight",
                unit="msg/s",
            )
            results.note(
                f"Fan-out: enqueue_many returned after {returned:.1f} s; the relay then "
                f"published what it had left over, done at {ours:.1f} s (the figure); "
                f"{owed} relay passes were needed."
            )
    results.ratio(
        "enqueue_many fan-out / raw pipelined publish",
        "fleet.fanout.aq",
        "fleet.fanout.raw",
        Target(0.8),
    )


async def _confirmed_by_broker(store: RabbitMQStore) -> int:
    """Waits until the broker confirmed every command: a publish that timed out inside
    ``enqueue_many`` was left to the outbox relay, so the relay is flushed until it succeeds.
    Returns how many relay passes that took."""
    passes = 0
    while True:
        passes += 1
        try:
            await store.relay_outbox()
        except BrokerError:
            continue
        return passes


SUMMARY_LIMITS = Limits(max_pending_per_device=1_000_000)


@asynccontextmanager
async def _sqlite() -> AsyncIterator[IndexedStore]:
    with temp_dir() as directory:
        url = f"sqlite+aiosqlite:///{directory / 'index.db'}"
        async with await SqlStore.connect(url, limits=SUMMARY_LIMITS) as store:
            yield store


@asynccontextmanager
async def _postgres() -> AsyncIterator[IndexedStore]:
    async with postgres_state() as store:
        yield store


OUTCOMES = 300


async def _fill(store: IndexedStore, count: int) -> str:
    """A rollout of ``count`` commands, half delivered, a few hundred of those with outcomes."""
    rollout = await store.enqueue_many(device_ids(count), PAYLOAD, TTL)
    ids = rollout.command_ids
    half = ids[: count // 2]
    for start in range(0, len(half), _CHUNK):
        await store.mark_delivered(half[start : start + _CHUNK])
    for index, command_id in enumerate(half[:OUTCOMES]):
        if index % 3 == 0:
            await store.fail_command(command_id, "bench")
        else:
            await store.complete_command(command_id)
    return rollout.rollout_id


async def _summary(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    count = sizes.rollout_summary
    tables: dict[str, Callable[[], AbstractAsyncContextManager[IndexedStore]]] = {
        "sqlite": _sqlite,
        "postgres": _postgres,
    }
    for name, table in tables.items():
        async with table() as store:
            started = time.perf_counter()
            rollout_id = await _fill(store, count)
            fill_seconds = time.perf_counter() - started
            for _ in range(sizes.runs):
                latencies: list[float] = []
                for _ in range(sizes.index_calls):
                    started = time.perf_counter()
                    summary = await store.rollout_summary(rollout_id)
                    latencies.append(time.perf_counter() - started)
                    if summary.total != count:
                        raise RuntimeError(f"the summary counts {summary.total}, not {count}")
                results.record(
                    f"fleet.summary.{name}",
                    statistics.median(latencies) * 1000,
                    group=SUMMARY,
                    label=f"{name}: rollout_summary of {count:,} commands",
                    unit="ms",
                    better="lower",
                )
        results.note(
            f"Rollout summary ({name}): {count:,} commands written by the index's enqueue_many, "
            f"half marked delivered, {min(OUTCOMES, count // 2)} outcomes, in "
            f"{fill_seconds:.0f} s; the figure is the median of {sizes.index_calls} calls "
            f"(target ≤ {SUMMARY_TARGET_MS:g} ms)."
        )


async def bench_fleet(ctx: Context) -> None:
    # The summary needs no broker: first, so a slow broker cannot hold it up.
    await _summary(ctx)
    await _fanout(ctx)
