"""RabbitMQStore against the real broker: what the queue holds and what devices get."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pika
import pytest

from amqp_queue import (
    Limits,
    MemoryStore,
    PendingCommand,
    QueueType,
    RabbitMQConfig,
    RabbitMQStore,
)
from amqp_queue.messages import COMMAND_TYPE, EXPIRES_AT, REQUIRES_CONFIRMATION
from tests.rabbitmq_support import AMQP_URL, delete_namespace, queue_depth, rabbitmq_store
from tests.support import FakeClock, eventually, unique


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[RabbitMQStore]:
    async with rabbitmq_store(tmp_path, clock=clock) as opened:
        yield opened


async def take_raw(store: RabbitMQStore, device_id: str) -> aio_pika.abc.AbstractIncomingMessage:
    """The head message of the device queue, requeued afterwards."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(store.config.queue_name(device_id), passive=True)
        message = await queue.get(timeout=5)
        assert message is not None
        await message.nack(requeue=True)
        return message


async def consume_for(store: RabbitMQStore, device_id: str, seconds: float) -> list[PendingCommand]:
    """What ``consume`` hands out within ``seconds``: for a test that nothing (more) comes."""
    received: list[PendingCommand] = []
    async with store.consume(device_id) as stream:
        try:
            async with asyncio.timeout(seconds):
                async for command in stream:
                    received.append(command)
        except TimeoutError:
            pass
    return received


async def consume_first(store: RabbitMQStore, device_id: str, count: int) -> list[PendingCommand]:
    """The first ``count`` commands ``consume`` hands out (fewer if 5 s pass first): a wrong
    one among them shows in the caller's assertion without waiting for a quiet window."""
    received: list[PendingCommand] = []
    async with store.consume(device_id) as stream:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                async for command in stream:
                    received.append(command)
                    if len(received) == count:
                        break
    return received


async def test_message_is_persistent_with_id_expiration_and_headers(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    command_id = await store.enqueue_or_update("dev-1", "setpoint", b"21.5", 120)

    message = await take_raw(store, "dev-1")

    assert message.body == b"21.5"
    assert message.message_id == command_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.expiration == 120.0
    assert message.type == "setpoint"
    expires_at = clock.now + timedelta(seconds=120)
    assert message.routing_key == "dev-1"
    assert message.headers == {
        COMMAND_TYPE: "setpoint",
        EXPIRES_AT: int(expires_at.timestamp() * 1000),
        REQUIRES_CONFIRMATION: False,
    }


async def test_plain_command_has_no_command_type_header(store: RabbitMQStore) -> None:
    await store.enqueue("dev-1", b"reboot", 60)

    message = await take_raw(store, "dev-1")

    assert COMMAND_TYPE not in message.headers
    assert message.type is None
    assert message.routing_key == "dev-1"


async def test_a_plain_pika_consumer_reads_the_command_and_its_headers(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    command_id = await store.enqueue_or_update("dev-1", "mode", b"eco", 300)
    queue = store.config.queue_name("dev-1")

    def read_with_pika() -> tuple[bytes, Any]:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            for method, properties, body in channel.consume(queue, inactivity_timeout=5):
                assert method is not None, "no message within 5 s"
                channel.basic_ack(method.delivery_tag)
                channel.cancel()
                return body, properties
            raise AssertionError("consumer ended without a message")
        finally:
            connection.close()

    body, properties = await asyncio.to_thread(read_with_pika)

    assert body == b"eco"
    assert properties.message_id == command_id
    assert properties.delivery_mode == 2
    assert properties.headers[COMMAND_TYPE] == "mode"
    expiry = datetime.fromtimestamp(properties.headers[EXPIRES_AT] / 1000, UTC)
    assert abs(expiry - (clock.now + timedelta(seconds=300))) < timedelta(milliseconds=1)


async def test_stale_messages_in_the_queue_are_never_handed_out(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    await store.enqueue_or_update("dev-1", "setpoint", b"superseded", 600)
    await store.enqueue_or_update("dev-1", "setpoint", b"latest", 600)
    await store.cancel_command(await store.enqueue("dev-1", b"cancelled", 600))
    await store.enqueue("dev-1", b"expired", 30)
    await store.enqueue("dev-1", b"live", 600)
    clock.advance(60)

    assert await queue_depth(store, "dev-1") == 5
    assert [c.payload for c in await consume_first(store, "dev-1", 2)] == [b"latest", b"live"]
    assert await queue_depth(store, "dev-1") == 0


async def test_drain_drops_stale_messages_in_the_queue(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    await store.enqueue_or_update("dev-1", "setpoint", b"superseded", 600)
    await store.enqueue_or_update("dev-1", "setpoint", b"latest", 600)
    await store.cancel_command(await store.enqueue("dev-1", b"cancelled", 600))
    await store.enqueue("dev-1", b"expired", 30)
    clock.advance(60)

    assert await store.drain_pending("dev-1") == [b"latest"]
    assert await queue_depth(store, "dev-1") == 0


async def test_confirmation_command_is_published_only_on_confirm(store: RabbitMQStore) -> None:
    command_id = await store.enqueue_with_confirmation("dev-1", "unlock", b"door", 60)
    await store.ensure_queue("dev-1")

    assert await queue_depth(store, "dev-1") == 0

    await store.confirm_command(command_id)

    assert await queue_depth(store, "dev-1") == 1
    message = await take_raw(store, "dev-1")
    assert message.headers[REQUIRES_CONFIRMATION] is True
    assert [c.id for c in await consume_first(store, "dev-1", 1)] == [command_id]


async def test_expired_message_behind_a_long_lived_head_is_not_delivered(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with rabbitmq_store(tmp_path, clock=clock) as store:
        await store.enqueue("dev-1", b"long", 600)
        await store.enqueue("dev-1", b"short", 0.3)
        # The broker's TTL runs on its own clock: a witness with the same TTL, published
        # after the short one and alone at its queue's head, is dropped once it has passed.
        await store.enqueue("dev-2", b"witness", 0.3)
        await eventually(lambda: _queue_is_empty(store, "dev-2"), 10)
        clock.advance(0.3)

        # The broker only drops expired messages at the head: the short one is still there.
        assert await queue_depth(store, "dev-1") == 2
        assert await store.drain_pending("dev-1") == [b"long"]


async def _queue_is_empty(store: RabbitMQStore, device_id: str) -> bool:
    return await queue_depth(store, device_id) == 0


async def test_a_failing_loop_body_leaves_the_command_queued_for_the_next_consume(
    store: RabbitMQStore,
) -> None:
    command_id = await store.enqueue("dev-1", b"firmware", 60)

    async def failing_device() -> None:
        async with store.consume("dev-1") as stream:
            async for command in stream:
                assert command.id == command_id
                raise RuntimeError("device dropped")

    with pytest.raises(RuntimeError, match="device dropped"):
        await failing_device()

    assert await queue_depth(store, "dev-1") == 1
    assert [c.id for c in await consume_first(store, "dev-1", 1)] == [command_id]
    assert await consume_for(store, "dev-1", 0.3) == []
    assert await store.get_status(command_id) == "delivered"


async def test_leaving_the_loop_normally_acks_the_last_command(store: RabbitMQStore) -> None:
    first = await store.enqueue("dev-1", b"1", 60)
    second = await store.enqueue("dev-1", b"2", 60)

    async with store.consume("dev-1") as stream:
        async for command in stream:
            assert command.id == first
            break

    assert await store.get_status(first) == "delivered"
    assert await store.get_status(second) == "pending"
    assert [c.id for c in await consume_first(store, "dev-1", 1)] == [second]


async def test_consume_hands_out_commands_enqueued_while_it_waits(store: RabbitMQStore) -> None:
    received: list[bytes] = []
    waiting = asyncio.Event()

    async def device() -> None:
        async with store.consume("dev-1") as stream:
            # Set just before the loop asks for a command: this task runs on, without a
            # pause, into the empty queue's wait before the enqueues below start.
            waiting.set()
            async for command in stream:
                received.append(command.payload)
                if len(received) == 3:
                    return

    consumer = asyncio.create_task(device())
    await asyncio.wait_for(waiting.wait(), 5)
    for payload in (b"a", b"b", b"c"):
        await store.enqueue("dev-1", payload, 60)
    await asyncio.wait_for(consumer, 5)

    assert received == [b"a", b"b", b"c"]


async def test_a_device_whose_queue_was_never_declared_gets_its_command(tmp_path: Path) -> None:
    state_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    async with rabbitmq_store(tmp_path, state_url=state_url) as producer:
        command_id = await producer.enqueue("new-device", b"hello", 60)
        async with rabbitmq_store(
            tmp_path, state_url=state_url, exchange=producer.config.exchange
        ) as gateway:
            assert gateway.declared_devices == []
            received = await consume_first(gateway, "new-device", 1)

    assert [c.id for c in received] == [command_id]


async def test_outbox_relay_publishes_commands_the_broker_never_confirmed(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    # Written to the index as if another process had died before publishing.
    record = store.state.build("dev-1", None, b"orphan", 600, requires_confirmation=False)
    await store.state.add([record])
    await store.ensure_queue("dev-1")
    assert await queue_depth(store, "dev-1") == 0

    # Its writer may still be publishing it: a copy now would be a duplicate.
    assert await store.relay_outbox() == 0
    clock.advance(store.config.relay_lease)
    assert await store.relay_outbox() == 1
    assert await store.relay_outbox() == 0
    assert await store.drain_pending("dev-1") == [b"orphan"]


async def test_quorum_queues_on_request(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path, queue_type=QueueType.QUORUM) as store:
        await store.enqueue("dev-1", b"q", 60)

        message = await take_raw(store, "dev-1")
        assert message.body == b"q"
        assert await store.drain_pending("dev-1") == [b"q"]


async def test_drain_hands_out_thousands_of_concurrently_enqueued_commands_in_order(
    tmp_path: Path, clock: FakeClock
) -> None:
    limits = Limits(max_pending_per_device=2500)  # over the default, to queue so many
    async with rabbitmq_store(tmp_path, clock=clock, limits=limits) as store:
        sent = [str(n).encode() for n in range(2500)]
        await asyncio.gather(*(store.enqueue("dev-1", payload, 600) for payload in sent))

        assert await store.drain_pending("dev-1") == sent


async def test_a_store_on_caller_owned_connection_and_state_leaves_both_open(
    tmp_path: Path,
) -> None:
    config = RabbitMQConfig(exchange=unique("test."))
    connection = await aio_pika.connect_robust(AMQP_URL)
    state = MemoryStore()
    try:
        async with RabbitMQStore(connection, config, state=state) as store:
            await store.enqueue("dev-1", b"x", 60)
            assert await store.drain_pending("dev-1") == [b"x"]

        assert not connection.is_closed
        assert await state.get_pending("dev-1") == []
    finally:
        await connection.close()
        await delete_namespace(config.exchange, ["dev-1"])
