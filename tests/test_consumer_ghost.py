"""A consumer whose queue is deleted is cancelled, not moved onto the queue declared again.

Traced in the twenty-sixth session from a flaky adversarial test (commands of a retired
device out of order, about 1 run in 8 on Redis state): a drain's consumer registered just
before another store's retire deleted the queue got no ``basic.cancel``; the queue's first
messages once the publisher declared it again went to that consumer, were never sent to it,
and came back redelivered only when the drain closed its channel, after a new stream had
handed out later commands. A helper found the cause in RabbitMQ 3.10's channel
(``rabbit_channel``): when a consumed queue dies, the channel consumes again by the queue's
name (a remnant of mirrored-queue fail-over) and cancels only if that fails; a queue of that
name declared meanwhile gets the consumer, whose channel has already forgotten it, so its
deliveries are held unsent until the channel closes. The consumer argument
``x-cancel-on-ha-failover`` makes the broker cancel instead (0 of 200 races, against 10 to
19% without).

Here the library's consumer (an :class:`~amqp_queue.inbox.Inbox` with the arguments
``open_inbox`` gives it, as a drain and a stream open it) races a delete on another
connection and a publisher declaring the queue again as soon as it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from amqp_queue import BrokerError, RabbitMQConfig
from amqp_queue.inbox import Inbox, consumer_arguments
from amqp_queue.topology import Topology
from tests.rabbitmq_support import AMQP_URL
from tests.support import unique

RACES = 200
MESSAGES = 5


async def _declare_again_until_new(
    channel: AbstractChannel, name: str, deleted: asyncio.Event
) -> None:
    # As the publisher does once its publish comes back unroutable: the old queue's record
    # is gone before its process ends and the delete is answered.
    for _ in range(500):
        queue = await channel.declare_queue(name, durable=True)
        if deleted.is_set() or queue.declaration_result.consumer_count == 0:
            return
        await asyncio.sleep(0.0002)


async def _delete_soon(
    channel: AbstractChannel, name: str, deleted: asyncio.Event, delay: float
) -> None:
    await asyncio.sleep(delay)
    await channel.queue_delete(name)
    deleted.set()


async def _consume(inbox: Inbox, started: list[Inbox]) -> None:
    with contextlib.suppress(BrokerError):  # the queue went away under it: a 404
        await inbox.start()
        started.append(inbox)


@pytest.mark.timeout(120)
async def test_a_consumer_racing_its_queues_deletion_holds_nothing_back() -> None:
    rng = random.Random(26)
    config = RabbitMQConfig(exchange=unique("ghost."))
    connections = [await aio_pika.connect(AMQP_URL) for _ in range(4)]
    consuming, deleting, publishing, reading = connections
    held_back: list[int] = []
    try:
        publisher = await publishing.channel()
        topology = Topology(await consuming.channel(), config)
        await topology.declare_exchange()
        exchange = await publisher.get_exchange(config.exchange)
        for race in range(RACES):
            device = f"d{race}"
            name = config.queue_name(device)
            channel = await consuming.channel()
            remover = await deleting.channel()
            declarer = await publishing.channel()
            # Declared and bound first, as open_inbox does: the consume alone races.
            queue = await topology.declare_queue(channel, device)
            inbox = Inbox(channel, queue, config.prefetch, arguments=consumer_arguments(config))
            started: list[Inbox] = []
            deleted = asyncio.Event()
            await asyncio.gather(
                _consume(inbox, started),
                _delete_soon(remover, name, deleted, rng.uniform(0, 0.001)),
                _declare_again_until_new(declarer, name, deleted),
            )
            await (await publisher.declare_queue(name, durable=True)).bind(exchange, device)
            for n in range(MESSAGES):
                await exchange.publish(aio_pika.Message(str(n).encode()), routing_key=device)
            reader = await reading.channel()
            got = await _read(await reader.get_queue(name), started, 1.0)
            if got < MESSAGES:
                held_back.append(race)
            for opened in (channel, reader, declarer):
                if not opened.is_closed:
                    await opened.close()
            await remover.queue_delete(name)
            await remover.close()
        await topology.channel.close()
        await publisher.exchange_delete(config.exchange)
    finally:
        for connection in connections:
            await connection.close()
    assert not held_back, f"{len(held_back)} of {RACES} races held the new queue's messages"


async def _read(queue: AbstractQueue, inboxes: list[Inbox], seconds: float) -> int:
    """How many messages a consumer of ``queue`` and the library's ``inboxes`` (a consumer
    that came after the queue was declared again is the new queue's, and takes its share)
    receive, waiting up to ``seconds`` for all of them: held back ones never come, so a
    longer wait costs nothing."""
    got: list[AbstractIncomingMessage] = []

    async def take(message: AbstractIncomingMessage) -> None:
        got.append(message)
        await message.ack()

    await queue.consume(take)
    received, deadline = 0, asyncio.get_running_loop().time() + seconds
    while received + len(got) < MESSAGES and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
        received += sum(len(inbox.take_buffered()) for inbox in inboxes)
    return received + len(got)
