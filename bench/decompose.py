"""Sequential enqueue against its two parts: a durable commit and a publish-and-confirm.

An enqueue writes the command to the state index (a durable commit) and then publishes it
with a publisher confirm, one after the other: it cannot cost less than the two. Each run
times, back to back on the same services, a bare durable commit of one row on the same state
backend (SQLite: a sqlite3 connection on a thread of its own, WAL, ``synchronous=FULL``,
``BEGIN IMMEDIATE``/insert/``COMMIT`` in one hop, as the store's writer does; PostgreSQL: one
``INSERT`` on an asyncpg connection, ``synchronous_commit`` on), a bare aio-pika persistent
publish with its confirm to a bound durable queue, and amqp-queue's sequential enqueue.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import asyncpg

from amqp_queue import RabbitMQStore
from bench import rawamqp
from bench.backends import postgres_schema, state_url
from bench.harness import Context, Target
from bench.services import (
    PAYLOAD,
    POSTGRES_URL,
    TTL,
    device_ids,
    rabbitmq_store,
    raw_namespace,
    temp_dir,
)

GROUP = "Sequential enqueue, decomposed (mean per call)"
STATES = ("sqlite", "postgres")
_ROW = "CREATE TABLE bare (id TEXT PRIMARY KEY, device TEXT NOT NULL, payload BLOB NOT NULL)"

Commit = Callable[[str], Awaitable[None]]


@asynccontextmanager
async def sqlite_commit() -> AsyncIterator[Commit]:
    """A durable one-row commit on a SQLite file, on a thread of its own."""
    with temp_dir() as directory, ThreadPoolExecutor(max_workers=1) as thread:
        loop = asyncio.get_running_loop()

        def open_file() -> sqlite3.Connection:
            conn = sqlite3.connect(directory / "bare.db", isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_ROW)
            return conn

        conn = await loop.run_in_executor(thread, open_file)

        def insert(row_id: str) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO bare VALUES (?, ?, ?)", (row_id, "dev-00000", PAYLOAD))
            conn.execute("COMMIT")

        async def commit(row_id: str) -> None:
            await loop.run_in_executor(thread, insert, row_id)

        try:
            yield commit
        finally:
            await loop.run_in_executor(thread, conn.close)


@asynccontextmanager
async def postgres_commit() -> AsyncIterator[Commit]:
    """A durable one-row commit on PostgreSQL: one ``INSERT`` in its own transaction."""
    async with postgres_schema() as schema:
        conn = await asyncpg.connect(POSTGRES_URL.replace("postgresql+asyncpg", "postgresql"))
        try:
            await conn.execute(f'SET search_path TO "{schema}"')
            await conn.execute(_ROW.replace("BLOB", "BYTEA"))
            statement = await conn.prepare("INSERT INTO bare VALUES ($1, $2, $3)")

            async def commit(row_id: str) -> None:
                await statement.fetch(row_id, "dev-00000", PAYLOAD)

            yield commit
        finally:
            await conn.close()


BARE_COMMITS = {"sqlite": sqlite_commit, "postgres": postgres_commit}


async def _per_call(count: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Microseconds per call of ``count`` calls made one after the other."""
    started = time.perf_counter()
    for index in range(count):
        await call(index)
    return (time.perf_counter() - started) / count * 1e6


def _enqueues(store: RabbitMQStore, devices: list[str]) -> Callable[[int], Awaitable[str]]:
    targets = itertools.cycle(devices)
    return lambda _: store.enqueue(next(targets), PAYLOAD, TTL)


def _record(ctx: Context, key: str, label: str, micros: float) -> None:
    ctx.results.record(key, micros, group=GROUP, label=label, unit="µs", better="lower")


async def bench_decompose(ctx: Context) -> None:
    sizes = ctx.sizes
    devices = device_ids(sizes.devices)
    count = sizes.decompose
    for _ in range(sizes.runs):
        async with raw_namespace(devices) as raw:
            await rawamqp.publish_sequential(raw.exchange, devices, 10)  # warm
            started = time.perf_counter()
            await rawamqp.publish_sequential(raw.exchange, devices, count)
            publish = (time.perf_counter() - started) / count * 1e6
        _record(ctx, "bare.publish", "bare aio-pika persistent publish + confirm", publish)
        for kind in STATES:
            async with BARE_COMMITS[kind]() as commit:
                await _per_call(10, lambda _: commit(str(uuid.uuid4())))  # warm
                durable = await _per_call(count, lambda _: commit(str(uuid.uuid4())))
            async with state_url(kind) as url, rabbitmq_store(state_url=url) as store:
                for device in devices:
                    await store.ensure_queue(device)
                await _per_call(10, _enqueues(store, devices))
                enqueue = await _per_call(count, _enqueues(store, devices))
            _record(ctx, f"bare.commit.{kind}", f"bare durable commit of one row, {kind}", durable)
            _record(
                ctx,
                f"bare.parts.{kind}",
                f"sum: bare commit ({kind}) + bare publish + confirm",
                durable + publish,
            )
            label = f"amqp-queue enqueue, sequential, {kind}"
            _record(ctx, f"aq.enqueue.seq.{kind}", label, enqueue)
    for kind in STATES:
        ctx.results.ratio(
            f"sequential enqueue ({kind}) / (bare commit + bare publish-and-confirm)",
            f"aq.enqueue.seq.{kind}",
            f"bare.parts.{kind}",
            Target(1.2, "lower"),
        )
