"""Messages a store did not publish (other tools, other clients) never wedge a device queue."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from amqp_queue import RabbitMQConfig, RabbitMQStore
from tests.faults.states import STATE_KINDS, fresh_state, rabbitmq_on
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique


@pytest.fixture(params=STATE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RabbitMQStore]:
    exchange = unique("test.")
    async with fresh_state(request.param, tmp_path) as spec:
        try:
            async with rabbitmq_on(spec, AMQP_URL, RabbitMQConfig(exchange=exchange)) as opened:
                yield opened
        finally:
            await delete_namespace(exchange, ["dev-1"])


async def _publish_foreign(store: RabbitMQStore, message_ids: list[str | None]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(store.config.exchange)
        for message_id in message_ids:
            message = aio_pika.Message(b"foreign", message_id=message_id)
            await exchange.publish(message, routing_key="dev-1")


async def test_foreign_messages_without_a_command_id_are_dropped_by_drain_and_consume(
    store: RabbitMQStore,
) -> None:
    first = await store.enqueue("dev-1", b"first", 600)
    await _publish_foreign(store, ["not-a-uuid", None, "'; DROP TABLE command_queue;--"])
    await store.enqueue("dev-1", b"second", 600)
    await _publish_foreign(store, [first.upper(), "{" + first + "}"])
    await store.enqueue("dev-1", b"third", 600)

    assert await store.drain_pending("dev-1") == [b"first", b"second", b"third"]

    await _publish_foreign(store, ["not-a-uuid"])
    last = await store.enqueue("dev-1", b"last", 600)
    received = []
    async with store.consume("dev-1") as stream:
        async for command in stream:
            received.append(command.id)
            break
    assert received == [last]
