"""consume() hands a command out only if it is still live at that moment, not at prefetch time.

A stream takes a whole prefetch window from the broker and asks the index about it once; a
device may then spend a long time on each command. A command cancelled, superseded or expired
while the device works on an earlier one of the same window must not be handed out after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from amqp_queue import CommandStatus, RabbitMQStore
from tests.rabbitmq_support import rabbitmq_store
from tests.support import FakeClock

Meddle = Callable[[RabbitMQStore, str], Awaitable[None]]


async def _consume_meddling_after_the_first(
    store: RabbitMQStore, meddle: Meddle, victim: str, last: str
) -> list[bytes]:
    """Consumes until ``last``; while handling the first command, calls ``meddle(victim)``."""
    received: list[bytes] = []
    async with store.consume("dev-1") as stream:
        async for command in stream:
            if not received:
                await meddle(store, victim)
                await _work_on_it(store)
            received.append(command.payload)
            if command.id == last:
                break
    return received


async def _work_on_it(store: RabbitMQStore) -> None:
    """A device busy with a command for longer than the stream trusts its window."""
    await asyncio.sleep(store.config.recheck_after * 2)


async def test_a_command_cancelled_while_the_device_handles_an_earlier_one_is_not_handed_out(
    tmp_path: Path,
) -> None:
    async def cancel(store: RabbitMQStore, command_id: str) -> None:
        await store.cancel_command(command_id)

    async with rabbitmq_store(tmp_path) as store:
        await store.enqueue("dev-1", b"first", 600)
        victim = await store.enqueue("dev-1", b"cancelled", 600)
        last = await store.enqueue("dev-1", b"last", 600)

        received = await _consume_meddling_after_the_first(store, cancel, victim, last)

        assert received == [b"first", b"last"]
        assert await store.get_status(victim) == CommandStatus.CANCELLED


async def test_a_command_superseded_while_the_device_handles_an_earlier_one_is_not_handed_out(
    tmp_path: Path,
) -> None:
    replacement: list[str] = []

    async def supersede(store: RabbitMQStore, _: str) -> None:
        replacement.append(await store.enqueue_or_update("dev-1", "setpoint", b"21", 600))

    async with rabbitmq_store(tmp_path) as store:
        await store.enqueue("dev-1", b"first", 600)
        victim = await store.enqueue_or_update("dev-1", "setpoint", b"20", 600)
        await store.enqueue("dev-1", b"second", 600)

        received: list[bytes] = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                if not received:
                    await supersede(store, victim)
                    await _work_on_it(store)
                received.append(command.payload)
                if replacement and command.id == replacement[0]:
                    break

        assert received == [b"first", b"second", b"21"]
        assert await store.get_status(victim) == CommandStatus.SUPERSEDED


async def test_a_command_that_expires_while_the_device_handles_an_earlier_one_is_not_handed_out(
    tmp_path: Path,
) -> None:
    clock = FakeClock()

    async def let_it_expire(store: RabbitMQStore, _: str) -> None:
        clock.advance(120)

    async with rabbitmq_store(tmp_path, clock=clock) as store:
        await store.enqueue("dev-1", b"first", 600)
        victim = await store.enqueue("dev-1", b"short-lived", 60)
        last = await store.enqueue("dev-1", b"last", 600)

        received = await _consume_meddling_after_the_first(store, let_it_expire, victim, last)

        assert received == [b"first", b"last"]
        assert await store.get_status(victim) == CommandStatus.EXPIRED


async def test_a_command_the_device_finished_is_delivered_while_it_works_on_the_next(
    tmp_path: Path,
) -> None:
    """Not only once the whole prefetch window is used up: the mark is written at once."""
    async with rabbitmq_store(tmp_path) as store:
        first = await store.enqueue("dev-1", b"first", 600)
        await store.enqueue("dev-1", b"second", 600)
        last = await store.enqueue("dev-1", b"last", 600)

        statuses = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                if command.id != first:
                    await asyncio.sleep(0.2)  # the device at work; one write takes far less
                    statuses.append(await store.get_status(first))
                if command.id == last:
                    break

        assert statuses == [CommandStatus.DELIVERED, CommandStatus.DELIVERED]


async def test_a_command_cancelled_just_before_the_device_asks_for_it_is_not_handed_out(
    tmp_path: Path,
) -> None:
    """No time to spare: the cancel returns microseconds before the device asks."""
    async with rabbitmq_store(tmp_path, state_url="memory://") as store:
        first = await store.enqueue("dev-1", b"first", 600)
        victim = await store.enqueue("dev-1", b"cancelled", 600)
        last = await store.enqueue("dev-1", b"last", 600)

        received = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                received.append(command.payload)
                if command.id == first:
                    await store.cancel_command(victim)
                if command.id == last:
                    break

        assert received == [b"first", b"last"]
