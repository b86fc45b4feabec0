"""Every store the contract suite runs against; adding a backend is one entry in BACKENDS.

A backend factory is an async context manager that opens a fresh, isolated store with the
given options (``clock``, ``retention``, ``limits``) and tears it down afterwards.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from amqp_queue.state import IndexedStore, MemoryStore, RedisStore, SqlStore, Store
from amqp_queue.state.sql import command_queue
from tests.rabbitmq_support import rabbitmq_store
from tests.support import unique

POSTGRES_URL = os.environ.get(
    "AMQP_QUEUE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1/test"
)

REDIS_URL = os.environ.get("AMQP_QUEUE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

StoreFactory = Callable[..., AbstractAsyncContextManager[Store]]


@asynccontextmanager
async def memory_store(tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    async with MemoryStore(**options) as store:
        yield store


@asynccontextmanager
async def sqlite_store(tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'commands.db'}"
    async with await SqlStore.connect(url, **options) as store:
        yield store


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped with everything in it afterwards."""
    schema = unique("t_")
    admin = create_async_engine(POSTGRES_URL)
    try:
        async with admin.begin() as conn:
            await conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        yield schema
    finally:
        async with admin.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@asynccontextmanager
async def postgres_store(tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema, **options) as store,
    ):
        yield store


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    prefix = unique("test:") + ":"
    try:
        yield prefix
    finally:
        async with Redis.from_url(REDIS_URL) as client:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)


@asynccontextmanager
async def redis_store(tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    async with (
        redis_prefix() as prefix,
        await RedisStore.connect(REDIS_URL, prefix=prefix, **options) as store,
    ):
        yield store


@asynccontextmanager
async def rabbitmq_on_redis_store(tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    """RabbitMQ delivery with Redis as its state index."""
    async with (
        redis_prefix() as prefix,
        rabbitmq_store(tmp_path, state_url=f"{REDIS_URL}?prefix={prefix}", **options) as store,
    ):
        yield store


@asynccontextmanager
async def rabbitmq_on_postgres_store(tmp_path: Path, **options: Any) -> AsyncIterator[Store]:
    """RabbitMQ delivery with PostgreSQL as its state index, in a fresh schema named on the
    state URL (as a deployment configures it)."""
    async with postgres_schema() as schema:
        url = make_url(POSTGRES_URL).update_query_dict({"schema": schema})
        state_url = url.render_as_string(hide_password=False)
        async with rabbitmq_store(tmp_path, state_url=state_url, **options) as store:
            yield store


BACKENDS: dict[str, StoreFactory] = {
    "rabbitmq": rabbitmq_store,
    "rabbitmq-redis": rabbitmq_on_redis_store,
    "rabbitmq-postgres": rabbitmq_on_postgres_store,
    "memory": memory_store,
    "sqlite": sqlite_store,
    "postgres": postgres_store,
    "redis": redis_store,
}


INDEX_BACKENDS = ["memory", "sqlite", "postgres", "redis"]
"""The backends that are a state index (IndexedStore) by themselves."""


@asynccontextmanager
async def indexed_store(name: str, tmp_path: Path, **options: Any) -> AsyncIterator[IndexedStore]:
    """One of the index backends (memory, sqlite, postgres, redis), as an IndexedStore."""
    async with BACKENDS[name](tmp_path, **options) as store:
        assert isinstance(store, IndexedStore), f"{name} is not an index backend"
        yield store


async def commands_held(store: Store) -> int:
    """How many commands the store holds in all, live or finished: proves nothing was written."""
    inner = getattr(store, "state", store)
    if isinstance(inner, MemoryStore):
        return len(inner._records)
    if isinstance(inner, SqlStore):
        async with inner.engine.connect() as conn:
            count = await conn.scalar(sa.select(sa.func.count()).select_from(command_queue))
        return int(count or 0)
    if isinstance(inner, RedisStore):
        pattern = f"{inner.prefix}cmd:*"
        return len([key async for key in inner.client.scan_iter(match=pattern, count=1000)])
    raise TypeError(f"no command count for {type(store).__name__}")
