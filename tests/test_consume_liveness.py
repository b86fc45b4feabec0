"""consume() hands a command out only if it is still live at that moment, not at prefetch time.

A stream takes a whole prefetch window from the broker and asks the index about it once; a
device may then spend a long time on each command. A command cancelled, superseded or expired
while the device works on an earlier one of the same window must not be handed out after.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, QueueType, RabbitMQStore
from amqp_queue.state import SqlStore
from amqp_queue.state.model import CommandRecord
from amqp_queue.state.sql import create_engine
from amqp_queue.stream import CommandStream
from tests.rabbitmq_support import rabbitmq_store, store_on_index
from tests.support import FakeClock, eventually

Meddle = Callable[[RabbitMQStore, str], Awaitable[None]]

# 0: each command left in a window is asked about as it is handed out; 30: the window is
# asked about together, once the device has been busy longer than that.
RECHECK_AFTER = [0.0, 30.0]


class Stopwatch:
    """A monotonic clock for a stream, moved by the test: a device "works" for a minute
    without the test waiting for it."""

    def __init__(self) -> None:
        self.elapsed = 0.0

    def __call__(self) -> float:
        return self.elapsed


def _timed(stream: CommandStream) -> Stopwatch:
    stopwatch = Stopwatch()
    stream._clock = stopwatch  # the stream's own time source, for the recheck interval
    return stopwatch


async def _consume_meddling_after_the_first(
    store: RabbitMQStore, meddle: Meddle, victim: str, last: str
) -> list[bytes]:
    """Consumes until ``last``; while handling the first command, calls ``meddle(victim)``."""
    received: list[bytes] = []
    async with store.consume("dev-1") as stream:
        stopwatch = _timed(stream)
        async for command in stream:
            if not received:
                await meddle(store, victim)
                _work_on_it(store, stopwatch)
            received.append(command.payload)
            if command.id == last:
                break
    return received


def _work_on_it(store: RabbitMQStore, stopwatch: Stopwatch) -> None:
    """A device busy with a command for longer than the stream trusts its window."""
    stopwatch.elapsed += store.config.recheck_after * 2 + 1


@pytest.mark.parametrize("recheck_after", RECHECK_AFTER)
async def test_a_command_cancelled_while_the_device_handles_an_earlier_one_is_not_handed_out(
    tmp_path: Path, recheck_after: float
) -> None:
    async def cancel(store: RabbitMQStore, command_id: str) -> None:
        await store.cancel_command(command_id)

    async with rabbitmq_store(tmp_path, recheck_after=recheck_after) as store:
        await store.enqueue("dev-1", b"first", 600)
        victim = await store.enqueue("dev-1", b"cancelled", 600)
        last = await store.enqueue("dev-1", b"last", 600)

        received = await _consume_meddling_after_the_first(store, cancel, victim, last)

        assert received == [b"first", b"last"]
        assert await store.get_status(victim) == CommandStatus.CANCELLED


@pytest.mark.parametrize("recheck_after", RECHECK_AFTER)
async def test_a_command_superseded_while_the_device_handles_an_earlier_one_is_not_handed_out(
    tmp_path: Path, recheck_after: float
) -> None:
    replacement: list[str] = []

    async def supersede(store: RabbitMQStore, _: str) -> None:
        replacement.append(await store.enqueue_or_update("dev-1", "setpoint", b"21", 600))

    async with rabbitmq_store(tmp_path, recheck_after=recheck_after) as store:
        await store.enqueue("dev-1", b"first", 600)
        victim = await store.enqueue_or_update("dev-1", "setpoint", b"20", 600)
        await store.enqueue("dev-1", b"second", 600)

        received: list[bytes] = []
        async with store.consume("dev-1") as stream:
            stopwatch = _timed(stream)
            async for command in stream:
                if not received:
                    await supersede(store, victim)
                    _work_on_it(store, stopwatch)
                received.append(command.payload)
                if replacement and command.id == replacement[0]:
                    break

        assert received == [b"first", b"second", b"21"]
        assert await store.get_status(victim) == CommandStatus.SUPERSEDED


@pytest.mark.parametrize("recheck_after", RECHECK_AFTER)
async def test_a_command_that_expires_while_the_device_handles_an_earlier_one_is_not_handed_out(
    tmp_path: Path, recheck_after: float
) -> None:
    clock = FakeClock()

    async def let_it_expire(store: RabbitMQStore, _: str) -> None:
        clock.advance(120)

    async with rabbitmq_store(tmp_path, clock=clock, recheck_after=recheck_after) as store:
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

        async def first_delivered() -> bool:
            return await store.get_status(first) == CommandStatus.DELIVERED

        worked_on = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                if command.id != first:
                    # The device at work on this one: the first one's mark is written
                    # meanwhile (one write takes far less than the deadline).
                    await eventually(first_delivered, 5)
                    worked_on.append(command.payload)
                if command.id == last:
                    break

        assert worked_on == [b"second", b"last"]


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


class CancelsDuringOrderRead(SqlStore):
    """A SQLite index on which a command is cancelled (by an operator on another store, say)
    just as a quorum-queue stream reads the device's ready order, after it found the
    command's window live."""

    def __init__(self, path: Path) -> None:
        super().__init__(create_engine(f"sqlite+aiosqlite:///{path}"))
        self.victim: str | None = None
        self.cancelled = False

    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        if self.victim is not None and not self.cancelled:
            await self.cancel_command(self.victim)
            self.cancelled = True
        return await super().open_commands(device_id)


async def test_a_command_cancelled_as_a_quorum_stream_reads_its_ready_order_is_not_handed_out(
    tmp_path: Path,
) -> None:
    state = CancelsDuringOrderRead(tmp_path / "state.db")
    async with store_on_index(state, queue_type=QueueType.QUORUM) as store:
        victim = await store.enqueue("dev-1", b"cancelled", 600)
        state.victim = victim
        last = await store.enqueue("dev-1", b"last", 600)

        received: list[str] = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                received.append(command.id)
                if command.id == last:
                    break

        assert state.cancelled
        assert received == [last]
        assert await store.get_status(victim) is CommandStatus.CANCELLED
