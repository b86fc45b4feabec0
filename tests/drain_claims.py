"""A drain's two phases on an index alone, for tests that need commands delivered by a drain
(``claim``, then ``hand_over``) and not by a stream's mark."""

from __future__ import annotations

from collections.abc import Collection

from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.model import CommandRecord


async def drained(
    index: IndexedStore, device_id: str, command_ids: Collection[str] | None = None
) -> list[CommandRecord]:
    """Claims the device's deliverable commands (of ``command_ids``) and hands them over."""
    return await index.hand_over(await index.claim(device_id, command_ids))
