"""consume() acks finished commands a batch at a time, and never a command it failed to mark.

Marked commands are acked together with one ``multiple`` ack once they are a quarter of the
prefetch window, or before the stream waits for the broker or closes. Should marking a batch
delivered fail, those commands stay unacked and are marked again with the next batch, or
by themselves before the stream waits or closes: the device has them, so their status must
come to say DELIVERED. From then on each command is acked by itself (a ``multiple`` ack
would take the unmarked ones along). Should every try fail, the store keeps trying the
marks after the stream closed, and lands them before it hands out their requeued messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from pathlib import Path

import pytest
from aio_pika.abc import AbstractIncomingMessage

from amqp_queue import (
    CommandStatus,
    RabbitMQStore,
    delivery_marks,
    mark_commits,
    settlement,
)
from amqp_queue.state import SqlStore, StateError
from amqp_queue.state.sql import create_engine
from amqp_queue.stream import CommandStream
from tests.rabbitmq_support import queue_depth, store_on_index
from tests.support import eventually


class MarksFail(SqlStore):
    """A SQLite index whose first ``failures`` delivery marks fail, as a full disk would."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(create_engine(f"sqlite+aiosqlite:///{path}"))
        self.failures = failures
        self.failed: list[list[str]] = []

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        if len(self.failed) < self.failures:
            self.failed.append(list(command_ids))
            raise StateError("state index delivery mark failed: disk I/O error")
        return await super().mark_delivered(command_ids)


async def _consume(store: RabbitMQStore, count: int) -> list[str]:
    """Consumes ``count`` commands; the device lingers on the second one until the first
    one's mark has run (and failed) in a batch of its own."""
    seen: list[str] = []
    async with store.consume("dev-1") as stream:
        async for command in stream:
            seen.append(command.id)
            if len(seen) == 2:
                await _marks_written(stream)
            if len(seen) == count:
                break
    return seen


async def _marks_written(stream: CommandStream) -> None:
    """Returns once the marks the stream has posted so far have run, failed or not."""
    await stream._marks.drain()  # the stream's delivery marks


async def _statuses(store: RabbitMQStore, ids: list[str]) -> list[CommandStatus]:
    return [await store.get_status(command_id) for command_id in ids]


async def test_a_command_whose_mark_failed_is_marked_with_the_next_batch(
    tmp_path: Path,
) -> None:
    state = MarksFail(tmp_path / "state.db", failures=1)
    async with store_on_index(state) as store:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(4)]

        assert await _consume(store, len(ids)) == ids

        assert state.failed == [ids[:1]]
        assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * 4
        # Every command was acked, the one whose mark failed included: nothing comes again.
        assert await queue_depth(store, "dev-1") == 0


@pytest.mark.parametrize(
    "failures",
    [
        # The mark fails; the try before the stream waits for the broker succeeds.
        1,
        # That try fails too; the index is back a moment later, while the stream waits.
        2,
    ],
    ids=["tried-before-waiting", "tried-while-waiting"],
)
async def test_a_stream_that_waits_keeps_trying_a_failed_mark(
    tmp_path: Path, failures: int
) -> None:
    state = MarksFail(tmp_path / "state.db", failures=failures)
    async with store_on_index(state) as store:
        command_id = await store.enqueue("dev-1", b"only", 600)

        async def marked() -> bool:
            return await store.get_status(command_id) is CommandStatus.DELIVERED

        async with store.consume("dev-1") as stream:
            assert (await anext(stream)).id == command_id
            # Finishing it (asking for the next) posts its mark, which fails; nothing more
            # comes, so the stream waits, and retries meanwhile.
            waiting = asyncio.ensure_future(anext(stream))
            try:
                await eventually(marked, 10)
                assert not waiting.done(), "the stream stopped waiting"
            finally:
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
            assert state.failed == [[command_id]] * failures

        assert await queue_depth(store, "dev-1") == 0


async def test_a_prefetch_window_full_of_unmarked_commands_does_not_stall_the_stream(
    tmp_path: Path,
) -> None:
    # With prefetch 2 and two finished commands unmarked (and so unacked), the broker sends
    # nothing more until a retried mark acks them.
    state = MarksFail(tmp_path / "state.db", failures=3)
    async with store_on_index(state, prefetch=2) as store:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(4)]

        seen: list[str] = []
        async with store.consume("dev-1") as stream:
            async with asyncio.timeout(10):
                async for command in stream:
                    seen.append(command.id)
                    await _marks_written(stream)  # each mark runs (and fails) by itself
                    if len(seen) == len(ids):
                        break

        assert seen == ids
        assert len(state.failed) == 3
        assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * 4
        assert await queue_depth(store, "dev-1") == 0


async def test_commands_never_marked_are_not_handed_out_again_by_the_next_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every mark fails while the stream is open: the index is down until it closed. The
    # store keeps trying those marks (test_marks_after_close.py); the next stream of the
    # store that reads their requeued messages lands them first and drops the messages.
    monkeypatch.setattr(mark_commits, "OWED_RETRY_FIRST", 60.0)
    state = MarksFail(tmp_path / "state.db", failures=1_000)
    async with store_on_index(state) as store:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(4)]

        assert await _consume(store, len(ids)) == ids

        assert state.failed[0] == ids[:1]
        assert state.failed[-1] == ids  # the last try, at close, carried all four
        assert await _statuses(store, ids) == [CommandStatus.PENDING] * 4

        state.failures = 0  # the index is back
        newer = await store.enqueue("dev-1", b"newer", 600)
        async with store.consume("dev-1") as stream:
            again = await anext(stream)
        assert again.id == newer
        assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * 4
        assert await queue_depth(store, "dev-1") == 0


async def test_marked_commands_are_acked_together_and_none_is_left_unacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Marks as fast as the hand-outs would each ack one message, and the broker refill the
    # window one delivery at a time: the stream acks a quarter of the window at once.
    frames: list[tuple[str | None, bool]] = []
    settle = settlement.settle

    async def counted(
        message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False
    ) -> None:
        frames.append((message.message_id, multiple))
        await settle(message, ack=ack, multiple=multiple)

    monkeypatch.setattr(delivery_marks, "settle", counted)  # the stream's acks go there
    state = MarksFail(tmp_path / "state.db", failures=0)
    async with store_on_index(state, prefetch=8) as store:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(7)]
        seen: list[str] = []
        async with store.consume("dev-1") as stream:
            inbox = stream._inbox
            assert inbox is not None

            async def all_arrived() -> bool:
                return inbox._buffer.qsize() == len(ids)

            await eventually(all_arrived, 10)  # one window: the stream waits for nothing
            async for command in stream:
                seen.append(command.id)
                await _marks_written(stream)  # each mark by itself
                if len(seen) == 2:
                    # The first one marked, not acked yet.
                    assert frames == []
                if len(seen) == len(ids):
                    break
            assert frames == [(ids[1], True), (ids[3], True), (ids[5], True)]
        # The last one: acked when the stream closed.
        assert frames[-1] == (ids[6], True)
        assert seen == ids
        assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * len(ids)
        assert await queue_depth(store, "dev-1") == 0
