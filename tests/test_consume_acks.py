"""consume() acks finished commands a batch at a time, and never a command it failed to mark.

A batch of finished commands is acked with one ``multiple`` ack. Should marking a batch
delivered fail, those commands stay unacked for the broker to redeliver; a later ``multiple``
ack would take them along and lose them, so the stream then acks each command by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

from amqp_queue import CommandStatus
from state import SqlStore, StateError
from state.sql import create_engine
from tests.rabbitmq_support import store_on_index


class MarksFailOnce(SqlStore):
    """A SQLite index whose first ``mark_delivered`` fails, as a full disk would make it."""

    failed: list[str]

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        if not hasattr(self, "failed"):
            self.failed = list(command_ids)
            raise StateError("state index delivery mark failed: disk I/O error")
        return await super().mark_delivered(command_ids)


async def test_a_command_whose_mark_failed_is_redelivered_after_later_ones_are_acked(
    tmp_path: Path,
) -> None:
    state = MarksFailOnce(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"))
    async with store_on_index(state) as store:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(4)]

        first_pass: list[str] = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                first_pass.append(command.id)
                if len(first_pass) == 2:
                    # The device works on the second command while the first one's
                    # mark runs (and fails) in a batch of its own.
                    await asyncio.sleep(0.2)
                if len(first_pass) == len(ids):
                    break

        assert first_pass == ids
        assert state.failed == ids[:1]
        assert await store.get_status(ids[0]) == CommandStatus.PENDING
        assert [await store.get_status(i) for i in ids[1:]] == [CommandStatus.DELIVERED] * 3

        again: list[str] = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                again.append(command.id)
                break
        assert again == ids[:1]
        assert await store.get_status(ids[0]) == CommandStatus.DELIVERED
