"""State indexes for fault trials, named by a spec string a child process can be handed.

A spec is ``sqlite:<file>``, ``postgres:<schema>`` or ``redis:<key prefix>``. Each names an
isolated location: :func:`fresh_state` creates one and removes it afterwards. ``sql:<URL>``
names a whole database of its own (a private PostgreSQL server's), ``redis-at:<URL>`` a Redis
of its own (a private redis-server's; a ``?prefix=`` on the URL sets the key prefix).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika

from amqp_queue import RabbitMQConfig, RabbitMQStore
from amqp_queue.state import IndexedStore, RedisStore, SqlStore
from amqp_queue.state.clock import Clock, utc_now
from tests.backends import POSTGRES_URL, REDIS_URL, postgres_schema, redis_prefix
from tests.support import unique

STATE_KINDS = ("sqlite", "postgres", "redis")


@asynccontextmanager
async def fresh_state(kind: str, directory: Path) -> AsyncIterator[str]:
    """An empty state location of ``kind``; yields its spec and deletes it afterwards."""
    if kind == "sqlite":
        yield f"sqlite:{directory / unique('state-')}.db"
    elif kind == "postgres":
        async with postgres_schema() as schema:
            yield f"postgres:{schema}"
    elif kind == "redis":
        async with redis_prefix() as prefix:
            yield f"redis:{prefix}"
    else:
        raise ValueError(f"no state kind {kind!r}")


async def open_state_spec(spec: str, clock: Clock = utc_now) -> IndexedStore:
    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        return await SqlStore.connect(f"sqlite+aiosqlite:///{where}", clock=clock)
    if kind == "postgres":
        return await SqlStore.connect(POSTGRES_URL, schema=where, clock=clock)
    if kind == "sql":
        return await SqlStore.connect(where, clock=clock)
    if kind == "redis":
        return await RedisStore.connect(REDIS_URL, prefix=where, clock=clock)
    if kind == "redis-at":
        return await RedisStore.connect(where, clock=clock)
    raise ValueError(f"no state spec {spec!r}")


@asynccontextmanager
async def rabbitmq_on(
    spec: str, amqp_url: str, config: RabbitMQConfig, clock: Clock = utc_now
) -> AsyncIterator[RabbitMQStore]:
    """A started RabbitMQStore on the state ``spec`` names; closes it and what it opened."""
    state = await open_state_spec(spec, clock)
    try:
        connection = await aio_pika.connect_robust(amqp_url)
        try:
            async with RabbitMQStore(connection, config, state=state) as store:
                yield store
        finally:
            await connection.close()
    finally:
        await state.close()
