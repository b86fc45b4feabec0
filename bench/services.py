"""The real services the benchmarks use, and clean-up of everything they create.

Every benchmark names what it creates uniquely (``bench.<random>``) and deletes it, so runs
never see each other's queues, tables or keys, nor those of the test suite.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange

from amqp_queue import Limits, RabbitMQConfig, RabbitMQStore

AMQP_URL = os.environ.get("AMQP_QUEUE_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "AMQP_QUEUE_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AMQP_QUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MQTT_HOST = os.environ.get("AMQP_QUEUE_BENCH_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("AMQP_QUEUE_BENCH_MQTT_PORT", "1883"))

PAYLOAD = bytes(range(64))
"""Every benchmark's command: 64 bytes."""
TTL = 3600.0


def unique(prefix: str = "bench") -> str:
    return f"{prefix}.{secrets.token_hex(4)}"


def device_ids(count: int) -> list[str]:
    return [f"dev-{index:05d}" for index in range(count)]


@contextmanager
def temp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="amqp-queue-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sqlite_url(directory: Path) -> str:
    return f"sqlite+aiosqlite:///{directory / 'state.db'}"


@asynccontextmanager
async def connection() -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(AMQP_URL)
    async with conn:
        yield conn


async def delete_queues(conn: AbstractConnection, names: Iterable[str]) -> None:
    """Deletes queues (messages and all), spread over channels: one channel's deletes run
    one after the other on the broker, a few dozen a second."""
    pending = list(names)
    channels = [await conn.channel() for _ in range(min(32, len(pending)))]
    try:
        await asyncio.gather(
            *(channels[i % len(channels)].queue_delete(name) for i, name in enumerate(pending))
        )
    finally:
        for channel in channels:
            await channel.close()


async def delete_namespace(exchange: str, queues: Iterable[str]) -> None:
    async with connection() as conn:
        await delete_queues(conn, queues)
        channel = await conn.channel()
        await channel.exchange_delete(exchange)


@dataclass(frozen=True, slots=True)
class RawNamespace:
    connection: AbstractConnection
    exchange: AbstractExchange

    def queue_name(self, device: str) -> str:
        return RabbitMQConfig(exchange=self.exchange.name).queue_name(device)


@asynccontextmanager
async def raw_namespace(devices: list[str]) -> AsyncIterator[RawNamespace]:
    """A direct exchange and one durable queue per device, as amqp-queue lays them out.

    The exchange is bound to a channel with publisher confirms.
    """
    name = unique("bench.raw")
    names = RabbitMQConfig(exchange=name)
    async with connection() as conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)
        try:
            for device in devices:
                queue = await channel.declare_queue(names.queue_name(device), durable=True)
                await queue.bind(exchange, routing_key=device)
            yield RawNamespace(conn, exchange)
        finally:
            await delete_queues(conn, (names.queue_name(device) for device in devices))
            cleanup = await conn.channel()
            await cleanup.exchange_delete(name)


BENCH_LIMITS = Limits(max_pending_per_device=1_000_000)
"""The drain benchmarks queue 10,000 commands on one device, over the default limit of
open commands per device; the limit is still checked on every write."""


@asynccontextmanager
async def rabbitmq_store(
    *, state_url: str | None = None, **config: Any
) -> AsyncIterator[RabbitMQStore]:
    """A RabbitMQStore in its own exchange namespace (SQLite state in a temporary file)."""
    exchange = unique("bench.aq")
    with temp_dir() as directory:
        store = await RabbitMQStore.connect(
            AMQP_URL,
            state_url=state_url or sqlite_url(directory),
            config=RabbitMQConfig(exchange=exchange, **{"limits": BENCH_LIMITS, **config}),
        )
        try:
            async with store:
                yield store
        finally:
            await delete_namespace(
                exchange, (store.config.queue_name(device) for device in store.declared_devices)
            )
