"""A drain claims its commands in the index only once it has read the device queue to the end.

A claim marks commands delivered before the drain hands them over, so a process that dies
between the two loses them from the device's view (``drain_pending`` is at-most-once across
a crash). The drain used to claim each window as it arrived and then go on asking the broker
(more windows, whether the queue was empty, the consumer's cancel): a death during any of
those round trips lost the windows already claimed. Now the drain reads everything first
and claims right before it hands over (once, up to 1,000 commands): a death while it reads
loses nothing.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import aio_pika

from amqp_queue import CommandStatus
from amqp_queue.state import SqlStore
from amqp_queue.state.model import CommandRecord
from tests.rabbitmq_support import AMQP_URL, store_over


class CountsConsumersAtClaim(SqlStore):
    """The real SQL index; each claim first looks, on a connection of its own, how many
    consumers the claimed device's queue still has."""

    queue_name = ""
    consumers_at_claim: list[int]

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(self.queue_name, passive=True)
            self.consumers_at_claim.append(queue.declaration_result.consumer_count or 0)
        return await super().claim(device_id, command_ids)


async def test_a_drain_claims_once_its_consumer_is_gone_and_hands_out_everything_in_order(
    tmp_path: Path,
) -> None:
    state = await CountsConsumersAtClaim.connect(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    assert isinstance(state, CountsConsumersAtClaim)
    state.consumers_at_claim = []
    try:
        # Windows of two: the old drain claimed three times, its consumer still reading.
        async with store_over(state, prefetch=2) as store:
            ids = [await store.enqueue("gw-1", b"%d" % n, 600) for n in range(7)]
            state.queue_name = store.config.queue_name("gw-1")
            drained = await store.drain_commands("gw-1")
            assert [record.id for record in drained] == ids
            assert state.consumers_at_claim == [0]
            assert {await store.get_status(i) for i in ids} == {CommandStatus.DELIVERED}
            assert await store.drain_pending("gw-1") == []
    finally:
        await state.close()
