"""The topology remembers a bounded number of declared device queues (``declared_cache``).

A process serving a large fleet meets each device once in a while; remembering every device
forever would grow without end. The most recently used queues are remembered; a forgotten
one is only declared again (idempotent, one round trip) on its next publish.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from amqp_queue import RabbitMQConfig
from amqp_queue.topology import Topology
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

DEVICES = [f"dev-{n}" for n in range(6)]


class CountingTopology(Topology):
    """Counts the declarations it sends to the broker, per device."""

    def __init__(self, channel: AbstractChannel, config: RabbitMQConfig) -> None:
        super().__init__(channel, config)
        self.declarations: list[str] = []

    async def declare_queue(
        self, channel: AbstractChannel, device_id: str, *, robust: bool = True
    ) -> AbstractQueue:
        self.declarations.append(device_id)
        return await super().declare_queue(channel, device_id, robust=robust)


@pytest.fixture
async def topology() -> AsyncIterator[CountingTopology]:
    config = RabbitMQConfig(exchange=unique("test."), declared_cache=3)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        counting = CountingTopology(await connection.channel(), config)
        await counting.declare_exchange()
        yield counting
    finally:
        await connection.close()
        await delete_namespace(config.exchange, DEVICES)


async def test_declared_queues_are_remembered_up_to_the_cache_size(
    topology: CountingTopology,
) -> None:
    for device in DEVICES:
        await topology.ensure_queue(device)

    assert topology.declared_devices == DEVICES[-3:]


async def test_the_least_recently_used_queue_is_forgotten_and_declared_again(
    topology: CountingTopology,
) -> None:
    for device in ("dev-0", "dev-1", "dev-2", "dev-0", "dev-3"):  # dev-0 used again: dev-1 goes
        await topology.ensure_queue(device)
    assert topology.declarations == ["dev-0", "dev-1", "dev-2", "dev-3"]

    await topology.ensure_queue("dev-0")
    await topology.ensure_queue("dev-1")

    assert topology.declarations == ["dev-0", "dev-1", "dev-2", "dev-3", "dev-1"]


def test_a_declared_cache_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="declared_cache must be at least 1"):
        RabbitMQConfig(declared_cache=0)
