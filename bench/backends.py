"""Each state backend as a complete store on its own: enqueue and drain rates, no broker."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
from redis.asyncio import Redis

from amqp_queue.state import IndexedStore, MemoryStore, RedisStore, SqlStore
from amqp_queue.state.sql.engine import create_engine
from bench.harness import Context, rate
from bench.services import (
    PAYLOAD,
    POSTGRES_URL,
    REDIS_URL,
    TTL,
    device_ids,
    sqlite_url,
    temp_dir,
    unique,
)

GROUP = "State backends standalone (sequential enqueue; drain per device)"


@asynccontextmanager
async def sqlite_state() -> AsyncIterator[IndexedStore]:
    with temp_dir() as directory:
        store = await SqlStore.connect(f"sqlite+aiosqlite:///{directory / 'state.db'}")
        async with store:
            yield store


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A PostgreSQL schema of its own, dropped (with what is in it) afterwards."""
    schema = unique("bench").replace(".", "_")
    admin = create_engine(POSTGRES_URL)
    try:
        async with admin.begin() as conn:
            await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        try:
            yield schema
        finally:
            async with admin.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        await admin.dispose()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[tuple[Redis, str]]:
    """A Redis client and a key prefix of its own, whose keys are deleted afterwards."""
    prefix = unique("bench") + ":"
    client = Redis.from_url(REDIS_URL)
    try:
        yield client, prefix
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        await client.aclose()


@asynccontextmanager
async def postgres_state() -> AsyncIterator[IndexedStore]:
    async with postgres_schema() as schema:
        store = SqlStore(create_engine(POSTGRES_URL), schema=schema)
        try:
            await store.create_table()
            yield store
        finally:
            # Hands back the connections its hot paths keep checked out, then the engine.
            await store.close()
            await store.engine.dispose()


@asynccontextmanager
async def redis_state() -> AsyncIterator[IndexedStore]:
    async with redis_prefix() as (client, prefix):
        yield RedisStore(client, prefix=prefix)


@asynccontextmanager
async def state_url(kind: str) -> AsyncIterator[str]:
    """A ``state_url`` of ``kind`` (sqlite, postgres, redis) in a namespace of its own."""
    if kind == "sqlite":
        with temp_dir() as directory:
            yield sqlite_url(directory)
    elif kind == "postgres":
        async with postgres_schema() as schema:
            yield f"{POSTGRES_URL}?schema={schema}"
    elif kind == "redis":
        async with redis_prefix() as (_, prefix):
            yield f"{REDIS_URL}?prefix={prefix}"
    else:
        raise ValueError(f"no state backend {kind!r}")


@asynccontextmanager
async def memory_state() -> AsyncIterator[IndexedStore]:
    yield MemoryStore()


BACKENDS = {
    "sqlite": sqlite_state,
    "postgres": postgres_state,
    "redis": redis_state,
    "memory": memory_state,
}


async def bench_backends(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.devices)
    count = sizes.backend
    for _ in range(sizes.runs):
        for name, opened in BACKENDS.items():
            async with opened() as store:
                started = time.perf_counter()
                for _, device in zip(range(count), itertools.cycle(devices), strict=False):
                    await store.enqueue(device, PAYLOAD, TTL)
                seconds = time.perf_counter() - started
                results.record(
                    f"state.{name}.enqueue",
                    rate(count, seconds),
                    group=GROUP,
                    label=f"{name}: enqueue",
                    unit="cmd/s",
                )
                started = time.perf_counter()
                drained = 0
                for device in devices:
                    drained += len(await store.drain_pending(device))
                seconds = time.perf_counter() - started
                if drained != count:
                    raise RuntimeError(f"{name} drained {drained} of {count} commands")
                results.record(
                    f"state.{name}.drain",
                    rate(count, seconds),
                    group=GROUP,
                    label=f"{name}: drain_pending ({count // len(devices):,} per device)",
                    unit="cmd/s",
                )
    results.note(
        "State backends: SQLite is a file with synchronous=FULL (every enqueue fsynced); "
        "PostgreSQL is the local server with its defaults (synchronous_commit on); the Redis "
        "under test runs with persistence off, so its figures carry no durability at all; "
        "memory keeps nothing."
    )
