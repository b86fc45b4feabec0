"""A device retired while a stream reads it keeps no queue, and the store keeps its connection.

Found by the twenty-seventh session's probe: aio-pika (10.2.1) answers a broker's cancel of
a robust consumer (its queue deleted: the device retired by another store) by restoring
it: a probe channel declares the queue again, and the consumer comes back on it. Every
retire of a device whose stream read on a store connected for a while left its queue
behind (78 of 78 in a probe), and once in a probe's run the probe channel's close, cut by
the stream's own close, made aiormq send a second ``Channel.Close``, and RabbitMQ closed
the store's whole connection (504). After a reconnect the stream no longer heard the
cancel at all, and read on from the queue declared again. A stream now takes its consumer
out of aio-pika's restoring when the broker cancels it, also after a reconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiormq
import pytest

from amqp_queue import RabbitMQStore
from tests.faults.broker import close_connections_named
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store
from tests.support import eventually, unique

pytestmark = pytest.mark.timeout(60)


BODY = 1.0
QUIET = 6.0
"""Seconds the store's connection sits quiet first: its restoring loop then waits for work,
as in a store connected for a while (it sleeps ``reconnect_interval``, 5 s, after each round)."""


async def consumers_of(name: str) -> int | None:
    """The queue's consumers, None when it does not exist."""
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        try:
            declared = await channel.queue_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        return int(declared.consumer_count or 0)
    finally:
        await connection.close()


async def queue_exists(name: str) -> bool:
    return await consumers_of(name) is not None


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[RabbitMQStore, RabbitMQStore, str]]:
    """A reader store on a connection named for the test, and another on the same exchange."""
    name = unique("retired.")
    async with (
        rabbitmq_store(tmp_path, amqp_url=f"{AMQP_URL}?name={name}") as reader,
        rabbitmq_store(tmp_path, exchange=reader.config.exchange) as retirer,
    ):
        yield reader, retirer, name


async def reading(store: RabbitMQStore) -> asyncio.Task[None]:
    """A stream reading dev-1, once it has its first command."""
    got = asyncio.Event()

    async def read() -> None:
        async with store.consume("dev-1") as stream:
            async for _ in stream:
                got.set()
                await asyncio.sleep(BODY)  # the device at work as the retire comes

    task = asyncio.create_task(read())
    await asyncio.wait_for(got.wait(), 10)
    return task


async def test_a_retired_devices_queue_is_not_declared_again_by_its_stream(
    stores: tuple[RabbitMQStore, RabbitMQStore, str],
) -> None:
    reader, retirer, _ = stores
    await reader.ensure_queue("dev-1")
    await asyncio.sleep(QUIET)
    await reader.enqueue("dev-1", b"x", 600)
    stream = await reading(reader)

    await retirer.retire_device("dev-1")
    await asyncio.wait_for(stream, 10)  # the stream ends with its queue
    await asyncio.sleep(1.0)  # what the restoring would have done by now

    assert not await queue_exists(reader.config.queue_name("dev-1"))
    await reader.enqueue("dev-2", b"y", 600)  # the connection is the store's still
    assert await reader.drain_pending("dev-2") == [b"y"]


async def test_a_stream_restored_after_a_reconnect_ends_with_its_retired_queue(
    stores: tuple[RabbitMQStore, RabbitMQStore, str],
) -> None:
    reader, retirer, name = stores
    await reader.enqueue("dev-1", b"x", 600)
    stream = await reading(reader)
    assert await asyncio.to_thread(close_connections_named, name) == 1

    async def consumer_restored() -> bool:
        return await consumers_of(reader.config.queue_name("dev-1")) == 1

    await eventually(consumer_restored, 15)
    await asyncio.sleep(QUIET)

    await retirer.retire_device("dev-1")
    await asyncio.wait_for(stream, 10)

    assert not await queue_exists(reader.config.queue_name("dev-1"))
