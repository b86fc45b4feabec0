"""A copy of a command in a device queue does not move the command behind newer ones.

Found by the twenty-seventh session's probe (a Redis kill lost a publish mark, another
store's relay published the command again; the device's one reader later handed it out
after 11 newer commands): ``consume`` kept a command's latest delivery and acked the first,
which sat at the command's place in the queue. Inside the stream the order held; but once
the stream gave the command back (its loop body raised, the stream closed, the process
died) the broker requeued the copy at the copy's own place, behind the newer commands.
The first delivery is kept while its channel can still settle it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from amqp_queue import RabbitMQStore, ReceivedCommand, StateError
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store
from tests.test_stream_copies import _queued, _taken


class BodyFailed(Exception):
    pass


async def publish_copy_of(command: ReceivedCommand, queue_name: str) -> None:
    """What a relay's second publish of a command handed out leaves: a copy at the tail."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        copy = aio_pika.Message(command.payload, message_id=command.id, delivery_mode=2)
        await channel.default_exchange.publish(copy, routing_key=queue_name)


async def next_three(store: RabbitMQStore) -> list[bytes]:
    """The payloads of the next three commands a new stream of dev-1 hands out."""
    order: list[bytes] = []
    async with store.consume("dev-1") as stream:
        while len(order) < 3:
            async with asyncio.timeout(5):
                order.append((await anext(stream)).payload)
    return order


async def fail_on_first(store: RabbitMQStore) -> None:
    async with store.consume("dev-1") as stream:
        async for command in stream:
            raise BodyFailed(command.payload)  # at-least-once: it stays queued


async def test_a_command_given_back_with_a_copy_queued_keeps_its_place(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        ids = [await store.enqueue("dev-1", b"c%d" % n, 600) for n in (1, 2, 3)]
        # What a relay's second publish of c1 leaves: a copy behind the rest.
        taken = await _taken(store, "dev-1")
        await _queued(store, "dev-1", [taken[ids[0]], taken[ids[1]], taken[ids[2]], taken[ids[0]]])

        with pytest.raises(BodyFailed, match="c1"):
            await fail_on_first(store)

        assert await next_three(store) == [b"c1", b"c2", b"c3"]


async def test_a_copy_that_comes_while_a_mark_fails_does_not_move_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same, for a copy that comes after the hand-out (a review of the fix above): while
    the command's delivery mark failed, the stream kept the copy unacked and acked the
    first; the store closed with the mark still failing, and the next reader got c2, c3, c1."""
    async with (
        rabbitmq_store(tmp_path) as first,
        rabbitmq_store(tmp_path, exchange=first.config.exchange) as second,
    ):
        assert isinstance(first, RabbitMQStore)
        for n in (1, 2, 3):
            await first.enqueue("dev-1", b"c%d" % n, 600)

        async def index_down(*args: object, **kwargs: object) -> int:
            raise StateError("state index write failed: the connection was lost")

        monkeypatch.setattr(first.state, "mark_delivered", index_down)
        queue_name = first.config.queue_name("dev-1")
        async with first.consume("dev-1") as stream:
            for _ in range(3):
                async with asyncio.timeout(5):
                    command = await anext(stream)
                if command.payload == b"c1":
                    await publish_copy_of(command, queue_name)
            # The copy's window comes in; nothing more is handed out.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    await anext(stream)
        await first.close()  # the marks still failing: the next reader gets them again

        assert await next_three(second) == [b"c1", b"c2", b"c3"]
