"""A stream compares a command's expiry with the time it hands the command out, not the time
the index answered for it.

Found by a helper's probe (a stream on a busy event loop, TTLs of 20 to 300 ms): loop bodies
received commands up to 124 ms after their ``expires_at``, on every backend (classic queues
on PostgreSQL, quorum queues on all three), and those commands ended ``DELIVERED`` after
readers had seen ``EXPIRED``. The window's liveness answer was true when the index gave it,
and the stream handed the front out after further awaits (the answer's way back through a
busy loop, a quorum queue's order reads) without looking at its ``expires_at`` again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from datetime import datetime
from pathlib import Path

from amqp_queue import CommandStatus
from amqp_queue.state import CommandRecord, SqlStore
from tests.shared_index import shared_index

DEVICE = "dev-1"
TTL = 0.5


class LateAnswers(SqlStore):
    """An index whose window answers come back ``late`` seconds after they were made: a busy
    event loop, or a slow link, between the index and the stream."""

    late = 0.0

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        answer = await super().deliverable(command_ids)
        await asyncio.sleep(self.late)
        return answer


async def test_a_command_that_expired_while_its_window_answer_came_is_not_handed_out(
    tmp_path: Path,
) -> None:
    async with shared_index("sqlite", tmp_path) as shared:
        state = await shared.open_index(LateAnswers)
        assert isinstance(state, LateAnswers)
        async with shared.store(state) as store:
            command_id = await store.enqueue(DEVICE, b"short", TTL)
            later = await store.enqueue(DEVICE, b"long", 600)
            state.late = TTL + 0.2
            handed: list[tuple[bytes, datetime, datetime]] = []

            async def device() -> None:
                async with store.consume(DEVICE) as stream:
                    async for command in stream:
                        handed.append((command.payload, command.expires_at, state.clock()))

            consumer = asyncio.create_task(device())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3 * TTL + 1):
                    while len(handed) < 2 and not consumer.done():  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer

            stale = [(payload, got - expires) for payload, expires, got in handed if got >= expires]
            assert not stale, f"handed out after expiry: {stale}"
            assert [payload for payload, _, _ in handed] == [b"long"]
            assert await store.get_status(command_id) == CommandStatus.EXPIRED
            assert await store.get_status(later) == CommandStatus.DELIVERED
