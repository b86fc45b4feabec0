"""Review of fc8dd12 (foreign queues): the recovery the QueueMismatch message asks for is to
delete the queue. Once it is deleted, the relay that met the refusal still skips the device's
orphans for RETRY_AFTER, and does not hold the device either (ForeignQueues.skip runs before
orphan_devices/owing are computed), so the next enqueue to the device is published directly,
ahead of the older command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest

from amqp_queue import QueueType, foreign_queues
from tests.rabbitmq_support import AMQP_URL
from tests.test_adversarial_ninth import LONG, space_on, take


async def test_after_the_mismatched_queue_is_deleted_a_new_command_does_not_overtake_the_orphan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(foreign_queues, "RETRY_AFTER", 8.0)  # 30 s in the library
    async with space_on("sqlite", tmp_path) as space:
        device = space.device()
        writer = await space.open()
        await writer.ensure_queue(device)  # classic
        orphan = writer.build(device, None, b"orphan", LONG)
        await writer.state.write([orphan], ())  # a writer killed after its commit
        name = writer.config.queue_name(device)
        await writer.close()
        a = await space.open(relay_after=0.3, queue_type=QueueType.QUORUM)
        await asyncio.sleep(1.5)  # a's relay sweeps the orphan and meets QueueMismatch
        # The operator does what the error says: deletes the classic queue.
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)
        await asyncio.sleep(0.2)
        later = await a.enqueue(device, b"new", LONG)  # declares a quorum queue, publishes
        got = await take(a, device, {b"orphan", b"new"}, 15)
        print("handed out:", got)
        assert [p for _, p in got] == [b"orphan", b"new"], got
        assert later
