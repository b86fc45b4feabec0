"""RabbitMQStores that share one state index and one exchange, as several processes do.

``shared_index(kind, tmp_path)`` yields a :class:`SharedIndex`: ``open_index()`` opens one
more index client (SQLite file, PostgreSQL schema or Redis prefix) on the same data, and
``store(index)`` a started RabbitMQStore over it in the shared exchange. Everything is
closed, dropped and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika

from amqp_queue import RabbitMQConfig, RabbitMQStore
from amqp_queue.state import IndexedStore, RedisStore, SqlStore
from tests.backends import POSTGRES_URL, REDIS_URL, postgres_schema, redis_prefix
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

INDEX_KINDS = ["sqlite", "postgres", "redis"]
"""Durable indexes two RabbitMQStores can share."""


class SharedIndex:
    def __init__(self, kind: str, tmp_path: Path, stack: AsyncExitStack, **config: Any) -> None:
        self.kind = kind
        self.exchange = unique("test.")
        self.config = RabbitMQConfig(exchange=self.exchange, **config)
        self._tmp_path = tmp_path
        self._stack = stack
        self._where = ""
        self.devices: set[str] = set()

    async def _prepare(self) -> None:
        if self.kind == "postgres":
            self._where = await self._stack.enter_async_context(postgres_schema())
        elif self.kind == "redis":
            self._where = await self._stack.enter_async_context(redis_prefix())
        self._stack.push_async_callback(self._delete_namespace)

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding the shared ``command_queue``."""
        assert self.kind == "postgres"
        return self._where

    async def _delete_namespace(self) -> None:
        await delete_namespace(self.exchange, sorted(self.devices))

    async def open_index(
        self, index_class: type[IndexedStore] | None = None, **options: Any
    ) -> IndexedStore:
        """One more client of the shared index (closed at the end); ``index_class`` a
        subclass of the kind's store class, for failure injection; ``options`` (``limits``,
        say) go to its ``connect``."""
        index: IndexedStore
        if self.kind == "sqlite":
            sql = index_class or SqlStore
            assert issubclass(sql, SqlStore)
            index = await sql.connect(
                f"sqlite+aiosqlite:///{self._tmp_path / 'state.db'}", **options
            )
        elif self.kind == "postgres":
            sql = index_class or SqlStore
            assert issubclass(sql, SqlStore)
            index = await sql.connect(POSTGRES_URL, schema=self._where, **options)
        else:
            redis = index_class or RedisStore
            assert issubclass(redis, RedisStore)
            index = await redis.connect(REDIS_URL, prefix=self._where, **options)
        self._stack.push_async_callback(index.close)
        return index

    @asynccontextmanager
    async def store(self, index: IndexedStore, **config: Any) -> AsyncIterator[RabbitMQStore]:
        """A started RabbitMQStore over ``index`` in the shared exchange, with its own
        connection; ``config`` overrides the shared RabbitMQConfig's fields."""
        connection = await aio_pika.connect_robust(AMQP_URL)
        store = RabbitMQStore(connection, dataclasses.replace(self.config, **config), state=index)
        try:
            async with store:
                yield store
        finally:
            self.devices.update(store.declared_devices)
            await connection.close()


@asynccontextmanager
async def shared_index(kind: str, tmp_path: Path, **config: Any) -> AsyncIterator[SharedIndex]:
    async with AsyncExitStack() as stack:
        shared = SharedIndex(kind, tmp_path, stack, **config)
        await shared._prepare()
        yield shared


async def drain_until(
    store: RabbitMQStore, device_id: str, *, count: int, seconds: float
) -> list[bytes]:
    """Drains again and again until ``count`` payloads came or ``seconds`` passed; returns
    what came (fewer when time ran out: the caller's assertion says what was missing)."""
    received: list[bytes] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while len(received) < count and loop.time() < deadline:
        received += await store.drain_pending(device_id)
        if len(received) < count:
            await asyncio.sleep(0.05)
    return received
