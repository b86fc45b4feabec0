"""What the broker refuses for good is told apart from what a retry can fix.

A message over the broker's ``max_message_size`` closes the channel with 406
PRECONDITION_FAILED, and so does declaring a device queue that exists with another type.
Neither changes on a retry: publishing raises :class:`CommandRejected` (the outbox ends the
command ``REJECTED``) or :class:`QueueMismatch` (a configuration error), never a plain
:class:`BrokerError` that the outbox would retry forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest

from amqp_queue import (
    BrokerError,
    CommandRejected,
    Limits,
    MemoryStore,
    QueueError,
    QueueMismatch,
    QueueType,
    RabbitMQConfig,
)
from amqp_queue.publisher import Publisher
from amqp_queue.state.clock import utc_now
from amqp_queue.state.model import CommandRecord
from amqp_queue.topology import Topology
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

MiB = 1024 * 1024
BROKER_MAX = 128 * MiB  # RabbitMQ 3.10's default max_message_size, the test broker's


@asynccontextmanager
async def publishing(**settings: Any) -> AsyncIterator[tuple[Topology, Publisher]]:
    """A topology and publisher on a confirming robust channel, in a namespace of their own."""
    config = RabbitMQConfig(exchange=unique("test."), **settings)
    connection = await aio_pika.connect_robust(AMQP_URL)
    topology: Topology | None = None
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = Topology(channel, config)
        await topology.declare_exchange()
        yield topology, Publisher(topology, config, utc_now)
    finally:
        await connection.close()
        devices = [] if topology is None else topology.declared_devices
        await delete_namespace(config.exchange, devices)


def command(device: str, payload: bytes, limits: Limits) -> CommandRecord:
    return MemoryStore(limits=limits).build(device, None, payload, 60)


def test_a_payload_limit_over_the_brokers_message_size_is_refused() -> None:
    with pytest.raises(ValueError, match="max_message_size"):
        RabbitMQConfig(limits=Limits(max_payload_bytes=BROKER_MAX))
    with pytest.raises(ValueError, match="max_message_size"):
        RabbitMQConfig(max_message_size=MiB, limits=Limits(max_payload_bytes=MiB))

    assert RabbitMQConfig().max_message_size == BROKER_MAX
    RabbitMQConfig(limits=Limits(max_payload_bytes=BROKER_MAX - 64 * 1024))
    RabbitMQConfig(max_message_size=512 * MiB, limits=Limits(max_payload_bytes=256 * MiB))


@pytest.mark.slow
async def test_a_message_over_the_brokers_size_is_rejected_and_only_that_one() -> None:
    """Configured as if the broker took 512 MiB: the broker's 128 MiB decides. The publish
    queued behind it on the same channel fails too, but a retry of it can succeed."""
    limits = Limits(max_payload_bytes=256 * MiB)
    async with publishing(max_message_size=512 * MiB, limits=limits) as (_, publisher):
        big = command("dev-1", b"x" * (BROKER_MAX + 1), limits)
        small = command("dev-1", b"small", limits)

        outcomes = await asyncio.gather(
            publisher.publish(big), publisher.publish(small), return_exceptions=True
        )

        assert isinstance(outcomes[0], CommandRejected)
        assert isinstance(outcomes[0], BrokerError)
        assert big.id in str(outcomes[0])
        assert outcomes[1] is True or (
            isinstance(outcomes[1], BrokerError) and not isinstance(outcomes[1], CommandRejected)
        )
        assert await published_once_the_channel_is_back(publisher, small)


async def published_once_the_channel_is_back(publisher: Publisher, record: CommandRecord) -> bool:
    """Publishes as the outbox relay would: again while the refusal's channel reopens."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await publisher.publish(record)
            except BrokerError:
                await asyncio.sleep(0.05)


async def test_a_classic_store_meets_a_quorum_queue_with_a_clear_error() -> None:
    async with publishing() as (topology, publisher):
        config = RabbitMQConfig(exchange=topology.exchange.name)
        async with await aio_pika.connect(AMQP_URL) as connection:
            channel = await connection.channel()
            await channel.declare_queue(
                config.queue_name("dev-1"),
                durable=True,
                arguments={"x-queue-type": QueueType.QUORUM.value},
            )
        record = command("dev-1", b"x", config.limits)

        with pytest.raises(QueueMismatch, match="x-queue-type") as raised:
            await publisher.publish(record)
        assert isinstance(raised.value, QueueError)
        assert not isinstance(raised.value, BrokerError)
        with pytest.raises(QueueMismatch):
            await topology.ensure_queue("dev-1")
        # The mismatch cost the declaring channel; other devices go on.
        assert await publisher.publish(command("dev-2", b"y", config.limits)) is True


async def test_a_quorum_store_meets_a_classic_queue_with_a_clear_error() -> None:
    async with publishing(queue_type=QueueType.QUORUM) as (topology, _):
        async with await aio_pika.connect(AMQP_URL) as connection:
            channel = await connection.channel()
            name = RabbitMQConfig(exchange=topology.exchange.name).queue_name("dev-1")
            await channel.declare_queue(name, durable=True)

        with pytest.raises(QueueMismatch, match="x-queue-type"):
            await topology.ensure_queue("dev-1")


async def test_only_the_mismatched_queue_is_a_mismatch_when_its_channel_closes() -> None:
    """The refusal closes the declaring channel under every declaration in flight on it; the
    others are broker failures a retry fixes (the topology's own, on the reopened channel),
    not mismatches."""
    async with publishing() as (topology, _):
        config = RabbitMQConfig(exchange=topology.exchange.name)
        async with await aio_pika.connect(AMQP_URL) as connection:
            channel = await connection.channel()
            await channel.declare_queue(
                config.queue_name("dev-1"),
                durable=True,
                arguments={"x-queue-type": QueueType.QUORUM.value},
            )
        devices = ["dev-1", *(f"dev-{n}" for n in range(2, 12))]

        outcomes = await asyncio.gather(
            *(topology.ensure_queue(device) for device in devices), return_exceptions=True
        )

        assert isinstance(outcomes[0], QueueMismatch)
        for device, outcome in zip(devices[1:], outcomes[1:], strict=True):
            declared = isinstance(outcome, asyncio.Future) and outcome.exception() is None
            assert declared or type(outcome) is BrokerError, (device, outcome)
            await topology.ensure_queue(device)
