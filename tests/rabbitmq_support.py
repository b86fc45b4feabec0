"""Opening RabbitMQStores on the real broker, each in its own exchange namespace."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika

from amqp_queue import Observer, RabbitMQConfig, RabbitMQStore
from amqp_queue.state import DEFAULT_LIMITS, DEFAULT_RETENTION, IndexedStore, Limits, SqlStore
from amqp_queue.state.clock import utc_now
from tests.support import eventually, unique

AMQP_URL = os.environ.get("AMQP_QUEUE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def delete_namespace(
    exchange: str, devices: list[str] | None = None, *, amqp_url: str = AMQP_URL
) -> None:
    """Deletes an exchange and the device queues named after it (on the machine's broker
    unless ``amqp_url`` names another)."""
    config = RabbitMQConfig(exchange=exchange)
    names = [config.queue_name(device) for device in devices or []]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        # The broker runs one channel's methods one after another: a fan-out test's thousand
        # queues took four seconds to delete over one channel, so each of a few channels
        # deletes its share.
        lanes = min(DELETE_LANES, len(names))

        async def delete(share: list[str]) -> None:
            async with await connection.channel() as channel:
                for name in share:
                    await channel.queue_delete(name)

        await asyncio.gather(*(delete(names[lane::lanes]) for lane in range(lanes)))
        async with await connection.channel() as channel:
            await channel.exchange_delete(exchange)


DELETE_LANES = 8


@asynccontextmanager
async def rabbitmq_store(
    tmp_path: Path,
    *,
    state_url: str | None = None,
    exchange: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    retention: timedelta = DEFAULT_RETENTION,
    clock: Any = utc_now,
    amqp_url: str = AMQP_URL,
    observer: Observer | None = None,
    **config: Any,
) -> AsyncIterator[RabbitMQStore]:
    """A RabbitMQStore with its own exchange (so its own queues) and SQLite state file."""
    exchange = exchange or unique("test.")
    store = await RabbitMQStore.connect(
        amqp_url,
        state_url=state_url or f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        config=RabbitMQConfig(exchange=exchange, limits=limits, **config),
        clock=clock,
        retention=retention,
        observer=observer,
    )
    try:
        async with store:
            yield store
    finally:
        # Several nodes (failover tests): they all front the machine's broker.
        cleanup_url = amqp_url if "," not in amqp_url else AMQP_URL
        await delete_namespace(exchange, store.declared_devices, amqp_url=cleanup_url)


@asynccontextmanager
async def store_on_index(
    state: SqlStore, *, amqp_url: str = AMQP_URL, **config: Any
) -> AsyncIterator[RabbitMQStore]:
    """A started RabbitMQStore in its own namespace over a caller's SQL index, for tests that
    instrument the index; the index, connection and namespace are closed afterwards.
    ``amqp_url``: the machine's broker, maybe with a connection name (to close it by);
    ``config`` goes to RabbitMQConfig."""
    await state.create_table()
    try:
        async with store_over(state, amqp_url=amqp_url, **config) as store:
            yield store
    finally:
        await state.close()
        await state.engine.dispose()


@asynccontextmanager
async def store_over(
    state: IndexedStore, *, amqp_url: str = AMQP_URL, **config: Any
) -> AsyncIterator[RabbitMQStore]:
    """A started RabbitMQStore in its own namespace over a caller's index of any backend,
    which the caller closes; ``config`` goes to RabbitMQConfig."""
    exchange = unique("test.")
    connection = await aio_pika.connect_robust(amqp_url)
    store = RabbitMQStore(connection, RabbitMQConfig(exchange=exchange, **config), state=state)
    try:
        async with store:
            yield store
    finally:
        await connection.close()
        await delete_namespace(exchange, store.declared_devices)


async def queue_depth(store: RabbitMQStore, device_id: str) -> int:
    """Ready messages in the device queue, by a passive declare on a separate connection."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(store.config.queue_name(device_id), passive=True)
        return queue.declaration_result.message_count or 0


async def outbox_emptied(store: RabbitMQStore, seconds: float) -> None:
    """Waits until the store's index holds no ready command unpublished: whatever a dead
    writer or a failed call left has been swept by a relay (past its ``relay_after``), and
    what a store owed is published. Fails after ``seconds``."""

    async def empty() -> bool:
        return not await store.state.unpublished(1)

    await eventually(empty, seconds)


async def relays_leave(stores: Sequence[RabbitMQStore], devices: Sequence[str]) -> None:
    """Waits until each store's relay has swept the devices' orphans, met their queues'
    refusal of its settings (QueueMismatch) and ended that pass: it leaves those orphans,
    and the relay lease (given up in that pass), to a process that can publish them, and a
    command it is given for one of the devices goes behind them. Fails after 15 s."""

    async def leaving() -> bool:
        for store in stores:
            relay = store._relay
            assert relay is not None
            if not all(relay._foreign.leaves(d) and relay.holds(d) for d in devices):
                return False
        return True

    await eventually(leaving, 15)
