"""A consume() stream hands a command out once, however many copies of it the broker gives.

Copies of one command reach its queue when a publish is repeated after a lost confirm (the
relay publishes again what it cannot tell landed), and when a robust channel is restored: the
broker requeues what the lost channel held, the restored consumer receives it again, and the
stream still has the first delivery waiting in its window. Both copies are live in the index
until the first one's delivery mark lands; the stream must not hand out the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from amqp_queue import CommandStatus, QueueType, RabbitMQStore, ReceivedCommand
from amqp_queue.settlement import has_copies
from amqp_queue.stream import CommandStream
from tests.faults.broker import close_connections_named
from tests.rabbitmq_support import AMQP_URL, queue_depth, rabbitmq_store, store_on_index
from tests.support import eventually, unique
from tests.test_consume_acks import MarksFail

COPIES = 3


async def _taken(store: RabbitMQStore, device: str) -> dict[str, aio_pika.Message]:
    """Takes every message out of the device queue: a copy of each by command id, as a
    repeated publish would queue it again (same body, id, headers and properties)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(store.config.queue_name(device))
        taken: dict[str, aio_pika.Message] = {}
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            assert message.message_id is not None
            taken[message.message_id] = aio_pika.Message(
                message.body,
                headers=message.headers,
                message_id=message.message_id,
                delivery_mode=message.delivery_mode,
                expiration=message.expiration,
                timestamp=message.timestamp,
                type=message.type,
            )
            await message.ack()
        return taken


async def _queued(store: RabbitMQStore, device: str, messages: list[aio_pika.Message]) -> None:
    """Publishes the messages, in this order, straight to the device queue."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for message in messages:
            await channel.default_exchange.publish(
                message, routing_key=store.config.queue_name(device)
            )


async def _copied(store: RabbitMQStore, device: str, copies: int) -> None:
    """Replaces each message in the device queue by ``copies`` identical ones."""
    taken = await _taken(store, device)
    await _queued(store, device, [copy for copy in taken.values() for _ in range(copies)])


async def _held_again_then_stopped(
    stream: CommandStream,
    first: AbstractIncomingMessage,
    waiting: asyncio.Future[ReceivedCommand],
    seconds: float,
) -> None:
    """Waits until the stream keeps another delivery than ``first`` of its command whose
    mark failed, then ends the stream's wait for its next command."""

    async def held_again() -> bool:
        held = stream._marks.unmarked
        return bool(held) and held[0][0] is not first

    await eventually(held_again, seconds)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


@pytest.mark.parametrize("queue_type", [QueueType.CLASSIC, QueueType.QUORUM])
async def test_copies_of_a_command_in_one_window_are_handed_out_once(
    tmp_path: Path, queue_type: QueueType
) -> None:
    async with rabbitmq_store(tmp_path, queue_type=queue_type, prefetch=16) as store:
        device = "dev-copies"
        ids = [await store.enqueue(device, f"c{i}".encode(), 600) for i in range(4)]
        await _copied(store, device, COPIES)

        handed: list[str] = []
        async with store.consume(device) as stream:
            async for command in stream:
                handed.append(command.id)
                if set(handed) == set(ids):
                    break

        assert handed == ids
        for command_id in ids:
            assert await store.get_status(command_id) is CommandStatus.DELIVERED


async def test_a_copy_arriving_while_the_first_waits_in_the_window_is_not_handed_out_again(
    tmp_path: Path,
) -> None:
    """On a quorum queue the stream reads on while an older command is missing, with the
    newer ones waiting in its window; a copy of one of them arriving then (a repeated
    publish, or the broker's redelivery to a restored channel) is the same command."""
    async with rabbitmq_store(tmp_path, queue_type=QueueType.QUORUM, prefetch=16) as store:
        device = "dev-copies"
        first, second, third = [await store.enqueue(device, b"c", 600) for _ in range(3)]
        taken = await _taken(store, device)
        # The older command missing: the stream waits for it with the two newer in hand.
        await _queued(store, device, [taken[second], taken[third]])

        handed: list[str] = []
        async with store.consume(device) as stream:

            async def late() -> None:
                async def both_waiting() -> bool:
                    return len(stream._ready) == 2  # the stream reads on for the first

                await eventually(both_waiting, 5)
                await _queued(store, device, [taken[second], taken[first]])

            arriving = asyncio.create_task(late())
            async for command in stream:
                handed.append(command.id)
                if command.id == third:
                    break
        await arriving

        assert handed == [first, second, third]


async def test_a_handed_out_command_whose_mark_failed_stays_queued_across_a_restored_channel(
    tmp_path: Path,
) -> None:
    """The device has the command, its delivery mark fails, and the broker connection is
    lost: the broker requeues the command and gives it again to the restored consumer. The
    stream does not hand it out again, but must not ack that delivery either: the mark has
    not landed, so should the stream close before it does, the command has to come again
    (at-least-once), not stay PENDING with no message left in the broker."""
    state = MarksFail(tmp_path / "state.db", failures=10**6)
    name = unique("copies.")
    url = f"{AMQP_URL}?name={name}&reconnect_interval=0.2"
    async with store_on_index(state, amqp_url=url) as store:
        command_id = await store.enqueue("dev-1", b"only", 600)

        async with store.consume("dev-1") as stream:
            assert (await anext(stream)).id == command_id
            assert stream._current is not None
            first = stream._current[0]  # its delivery on the channel about to be lost
            # Finishing it posts its mark, which fails; the stream waits for the broker.
            waiting = asyncio.ensure_future(anext(stream))

            async def mark_failed() -> bool:
                return bool(state.failed)

            await eventually(mark_failed, 10)
            assert await asyncio.to_thread(close_connections_named, name) == 1

            # The restored channel's delivery is the one the stream keeps unacked.
            await _held_again_then_stopped(stream, first, waiting, 15)

        assert await store.get_status(command_id) is CommandStatus.PENDING
        assert await queue_depth(store, "dev-1") == 1


class Boom(Exception):
    """The loop body fails: its command must be requeued."""


async def test_a_lost_channels_delivery_and_its_copy_in_one_window_keep_the_live_one(
    tmp_path: Path,
) -> None:
    """A stream's buffer still holds a delivery of the lost channel when the restored
    consumer's copy of it arrives: both come in one window. The stream must keep the copy
    (the one it can still settle): the body of that command fails, and the command has to
    come again, not stay PENDING with no message in the broker. (Found by a review.)"""
    state = MarksFail(tmp_path / "state.db", failures=0)
    name = unique("copies.")
    url = f"{AMQP_URL}?name={name}&reconnect_interval=0.2"
    async with store_on_index(state, amqp_url=url, prefetch=16) as store:
        first = await store.enqueue("dev-1", b"a", 600)
        second = await store.enqueue("dev-1", b"b", 600)
        handed: list[str] = []

        async def fail_on_the_third() -> None:
            async with store.consume("dev-1") as stream:
                handed.append((await anext(stream)).id)  # the second waits in the window
                await store.enqueue("dev-1", b"c", 600)  # into the inbox's buffer

                def buffered(count: int) -> Callable[[], Awaitable[bool]]:
                    async def holds() -> bool:
                        assert stream._inbox is not None
                        return stream._inbox._buffer.qsize() >= count

                    return holds

                await eventually(buffered(1), 5)
                assert await asyncio.to_thread(close_connections_named, name) == 1
                await eventually(buffered(4), 15)  # the restored consumer's three copies
                handed.append((await anext(stream)).id)
                handed.append((await anext(stream)).id)
                raise Boom

        with pytest.raises(Boom):
            await fail_on_the_third()

        assert handed[:2] == [first, second]
        assert await store.get_status(handed[2]) is CommandStatus.PENDING
        assert await queue_depth(store, "dev-1") == 1


class SlowFailingMarks(MarksFail):
    """Every delivery mark takes a second, then fails."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, failures=10**6)
        self.marking = asyncio.Event()

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        self.marking.set()
        await asyncio.sleep(1.0)
        return await super().mark_delivered(command_ids)


async def test_a_copy_arriving_while_the_mark_runs_stays_queued_should_the_mark_fail(
    tmp_path: Path,
) -> None:
    """A repeated publish's copy of a handed-out command arrives while its delivery mark
    runs, and the mark fails: the command stays in the broker (the device has it; should the
    mark never land, it comes again). (Written by a review.) The first delivery is what
    stays, on its channel still open, at the command's place in the queue; the copy, at the
    tail, goes (tests/test_copy_keeps_order.py)."""
    state = SlowFailingMarks(tmp_path / "state.db")
    async with store_on_index(state) as store:
        command_id = await store.enqueue("dev-1", b"x", 600)
        taken = await _taken(store, "dev-1")
        await _queued(store, "dev-1", [taken[command_id]])
        async with store.consume("dev-1") as stream:
            assert (await anext(stream)).id == command_id
            assert stream._current is not None
            first = stream._current[0]
            waiting = asyncio.ensure_future(anext(stream))
            await asyncio.wait_for(state.marking.wait(), 5)
            await _queued(store, "dev-1", [taken[command_id]])

            async def copy_dropped() -> bool:
                # Received, and settled by the failed mark's end: the first is held still.
                received = stream._inbox is not None and stream._inbox.last is not first
                held = stream._marks.unmarked
                settled = command_id not in stream._marks._copies
                return received and settled and bool(held) and held[0][0] is first

            await eventually(copy_dropped, 10)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting

        assert await store.get_status(command_id) is CommandStatus.PENDING
        assert await queue_depth(store, "dev-1") == 1


async def test_a_copy_kept_in_an_earlier_place_does_not_take_the_next_command_with_its_ack(
    tmp_path: Path,
) -> None:
    """[A, B, A'] in one window of a classic queue: A' is kept in A's place, and from then on
    each command is acked by itself. A multiple ack of A' (the highest tag) would also ack
    B, still in hand: B's body fails, and B must come again. (Written by a review.)"""
    state = MarksFail(tmp_path / "state.db", failures=0)
    async with store_on_index(state, prefetch=4) as store:
        first = await store.enqueue("dev-1", b"a", 600)
        second = await store.enqueue("dev-1", b"b", 600)
        taken = await _taken(store, "dev-1")
        await _queued(store, "dev-1", [taken[first], taken[second], taken[first]])
        handed: list[str] = []

        async def fail_on_the_second() -> None:
            async with store.consume("dev-1") as stream:
                async for command in stream:
                    handed.append(command.id)
                    if command.id == second:
                        raise Boom

        with pytest.raises(Boom):
            await fail_on_the_second()

        assert handed == [first, second]
        assert await store.get_status(first) is CommandStatus.DELIVERED
        assert await store.get_status(second) is CommandStatus.PENDING
        assert await queue_depth(store, "dev-1") == 1


def test_foreign_messages_with_no_id_are_no_copies_of_each_other() -> None:
    # A review: the stream counted distinct message ids, so two foreign messages with no id
    # in one window counted as a copy and the stream acked singly from then on.
    def messages(*ids: str | None) -> list[AbstractIncomingMessage]:
        return [cast(AbstractIncomingMessage, SimpleNamespace(message_id=i)) for i in ids]

    command = str(uuid.uuid4())
    assert not has_copies(messages(None, None, "not-a-command", "not-a-command", command))
    assert has_copies(messages(None, command, command))
