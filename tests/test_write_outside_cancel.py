"""A review: a write outside the group commit cancelled while it waits for its turn."""

from __future__ import annotations

import asyncio
from contextlib import suppress

from amqp_queue.observer import Observer
from amqp_queue.publish_path import PublishPath
from amqp_queue.state import MemoryStore


async def test_a_write_outside_cancelled_before_its_turn_is_taken_back() -> None:
    path = PublishPath(MemoryStore(), Observer())
    landed: list[str] = []

    async def writing() -> list[str]:
        landed.append("late")
        return []

    async with path._turn:  # a group commit under way (a stalled index)
        call = asyncio.ensure_future(path.write_outside(writing(), lambda _: []))
        await asyncio.sleep(0.01)
        call.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.wait_for(call, 1)  # no wait for a write that never started
    await asyncio.sleep(0.01)

    assert call.cancelled()
    assert landed == []  # nothing written after the call raised
