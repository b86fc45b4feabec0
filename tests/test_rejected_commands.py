"""A command the broker refuses for good ends REJECTED through the store, and blocks nothing.

The publisher tells a refusal apart (tests/test_broker_refusals.py); here the store and its
outbox relay act on it: the command's status is final, the relay does not send it again,
and other commands keep flowing. A queue that exists with another type is refused at
enqueue, before anything is written.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from amqp_queue import BrokerError, CommandStatus, Limits, QueueMismatch, QueueType
from tests.backends import commands_held
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store

MiB = 1024 * 1024
BROKER_MAX = 128 * MiB  # the test broker's max_message_size (RabbitMQ 3.10's default)
# Configured as if the broker took more than it does: its own limit then decides.
TOO_TRUSTING: dict[str, Any] = {
    "max_message_size": 512 * MiB,
    "limits": Limits(max_payload_bytes=256 * MiB),
}


@pytest.mark.slow
async def test_a_command_the_broker_refuses_ends_rejected_and_others_flow(
    tmp_path: Path,
) -> None:
    async with rabbitmq_store(tmp_path, **TOO_TRUSTING) as store:
        big = await store.enqueue("dev-big", b"x" * (BROKER_MAX + 1), 600)
        small = await store.enqueue("dev-small", b"small", 600)

        assert await store.get_status(big) == CommandStatus.REJECTED
        assert await store.get_pending("dev-big") == []
        assert await store.relay_outbox() == 0
        assert await store.drain_pending("dev-small") == [b"small"]
        assert await store.get_status(small) == CommandStatus.DELIVERED


@pytest.mark.slow
async def test_the_relay_rejects_a_refused_command_instead_of_resending_it(
    tmp_path: Path,
) -> None:
    # relay_after=0: the relay takes what another writer left at once.
    async with rabbitmq_store(tmp_path, relay_after=0, **TOO_TRUSTING) as store:
        big = store.build("dev-big", None, b"x" * (BROKER_MAX + 1), 600)
        small = store.build("dev-small", None, b"small", 600)
        await store.state.add([big, small])

        # The refusal closes the publishing channel, so small may fail with it: it is
        # published by a later pass once the channel is back; big is not sent again.
        async with asyncio.timeout(30):  # a 128 MiB publish, slow on a busy machine
            while True:
                try:
                    await store.relay_outbox()
                    break
                except BrokerError:
                    await asyncio.sleep(0.05)

        assert await store.get_status(big.id) == CommandStatus.REJECTED
        assert await store.state.unpublished(10) == []
        assert await store.drain_pending("dev-small") == [b"small"]


async def test_an_enqueue_to_a_queue_of_another_type_is_refused_before_the_write(
    tmp_path: Path,
) -> None:
    async with rabbitmq_store(tmp_path) as store:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(
                store.config.queue_name("dev-q"),
                durable=True,
                arguments={"x-queue-type": QueueType.QUORUM.value},
            )
        with pytest.raises(QueueMismatch, match="x-queue-type"):
            await store.enqueue("dev-q", b"never", 600)
        with pytest.raises(QueueMismatch):
            await store.enqueue_with_confirmation("dev-q", "unlock", b"never", 600)

        assert await commands_held(store) == 0
        # Other devices are not affected.
        await store.enqueue("dev-ok", b"fine", 600)
        assert await store.drain_pending("dev-ok") == [b"fine"]
