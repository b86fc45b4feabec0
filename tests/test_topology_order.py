"""Publishes to a new device keep their order across its queue's declaration.

Seen in CI: of 2,500 concurrent enqueues to a new device, two of a later write batch were
queued ahead of a thousand earlier ones. The earlier ones waited for the queue's declaration;
the later ones, woken in the step between the declaration's end and the waiters' wake-up,
found the queue declared and went straight to the channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from amqp_queue import RabbitMQConfig
from amqp_queue.topology import Topology
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique


class HeldDeclaration(Topology):
    """Declares for real once ``release`` is set; then, like a write batch committed at that
    moment, starts a caller that is scheduled before the waiters wake."""

    def __init__(self, channel: AbstractChannel, config: RabbitMQConfig) -> None:
        super().__init__(channel, config)
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.in_line = 0
        self.three_in_line = asyncio.Event()
        self.order: list[str] = []
        self.latecomer: asyncio.Task[None] | None = None

    async def declare_queue(
        self, channel: AbstractChannel, device_id: str, *, robust: bool = True
    ) -> AbstractQueue:
        self.held.set()
        await self.release.wait()
        queue = await super().declare_queue(channel, device_id, robust=robust)
        self.latecomer = asyncio.create_task(self.publish_in_turn(device_id, "latecomer"))
        return queue

    async def _wait_in_line(self, device_id: str, declared: asyncio.Future[None]) -> None:
        self.in_line += 1
        if self.in_line == 3:
            self.three_in_line.set()
        await super()._wait_in_line(device_id, declared)

    async def publish_in_turn(self, device_id: str, name: str) -> None:
        await self.ensure_queue(device_id)
        self.order.append(name)  # where a publish would take the channel's lock


@pytest.fixture
async def topology() -> AsyncIterator[HeldDeclaration]:
    config = RabbitMQConfig(exchange=unique("test."))
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        held = HeldDeclaration(channel, config)
        await held.declare_exchange()
        yield held
    finally:
        await connection.close()
        await delete_namespace(config.exchange, ["dev-1"])


async def test_a_caller_arriving_as_the_declaration_ends_waits_behind_earlier_ones(
    topology: HeldDeclaration,
) -> None:
    names = ["declarer", "first", "second", "third"]
    callers = [asyncio.create_task(topology.publish_in_turn("dev-1", name)) for name in names]
    # All four are in: one declaring, three waiting.
    await asyncio.wait_for(asyncio.gather(topology.held.wait(), topology.three_in_line.wait()), 5)
    topology.release.set()
    await asyncio.gather(*callers)
    assert topology.latecomer is not None
    await topology.latecomer

    assert topology.order == [*names, "latecomer"]


async def test_once_the_line_has_passed_a_caller_takes_the_fast_path(
    topology: HeldDeclaration,
) -> None:
    topology.release.set()
    await topology.publish_in_turn("dev-1", "declarer")
    assert topology.latecomer is not None
    await topology.latecomer

    # Declared, nobody waiting: it returns without suspending once (StopIteration).
    with pytest.raises(StopIteration):
        topology.ensure_queue("dev-1").send(None)


async def test_a_caller_behind_one_cancelled_in_line_waits_for_the_declaration(
    topology: HeldDeclaration,
) -> None:
    """Found by the full adversarial matrix (cancelled confirms, eighteenth session): the
    first caller in line, cancelled while the declaration still ran, let the one behind it go
    on, which then read the declaration's result before there was one (InvalidStateError)."""
    names = ["declarer", "first", "second", "third"]
    callers = {name: asyncio.create_task(topology.publish_in_turn("dev-1", name)) for name in names}
    await asyncio.wait_for(asyncio.gather(topology.held.wait(), topology.three_in_line.wait()), 5)
    callers["first"].cancel()
    await asyncio.sleep(0)  # the cancelled caller leaves the line; the declaration still runs
    await asyncio.sleep(0)
    assert topology.order == []
    topology.release.set()
    await asyncio.gather(callers["declarer"], callers["second"], callers["third"])
    assert topology.latecomer is not None
    await topology.latecomer
    assert callers["first"].cancelled()
    assert topology.order == ["declarer", "second", "third", "latecomer"]
