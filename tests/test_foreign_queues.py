"""A store whose ``queue_type`` is not the device queues' (a misconfigured process on a shared
index) leaves the commands it cannot publish to a process that can: never rejected, and its
relay does not keep the lease over them. Round 12 (tests/test_adversarial_twelfth.py) found
such a store ending other stores' commands ``REJECTED``."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pytest

from amqp_queue import CommandStatus, QueueType, foreign_queues
from tests.rabbitmq_support import AMQP_URL, relays_leave
from tests.test_adversarial_ninth import LONG, space_on, take
from tests.test_adversarial_seams import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_mismatched_relay_leaves_a_dead_writers_command_to_a_matching_one(
    backend: str, tmp_path: Path
) -> None:
    """A writer (classic queues) died between its write and its publish. A misconfigured
    store (quorum) starts first, takes the relay lease and meets the queue's refusal; a
    store configured as the queue is, started after it, must get the lease and publish the
    command, the device receiving it once."""
    async with space_on(backend, tmp_path) as space:
        device = space.device()
        writer = await space.open()
        await writer.ensure_queue(device)
        # Written and never published: what a writer killed after its commit leaves.
        orphan = writer.build(device, None, b"orphan", LONG)
        await writer.state.write([orphan], ())
        await writer.close()
        mismatched = await space.open(relay_after=0.3, queue_type=QueueType.QUORUM)
        await relays_leave([mismatched], [device])  # its relay's sweep met the refusal
        assert await mismatched.get_status(orphan.id) is CommandStatus.PENDING
        matching = await space.open(relay_after=0.3)
        got = await take(matching, device, {b"orphan"}, 15)
        assert [(command_id, payload) for command_id, payload in got] == [(orphan.id, b"orphan")]
        assert await matching.get_status(orphan.id) is CommandStatus.DELIVERED


async def test_after_the_mismatched_queue_is_deleted_a_new_command_does_not_overtake_the_orphan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator does what QueueMismatch says, deletes the queue, and the store that met
    the refusal enqueues to the device again: its new command must not overtake the older
    one its relay left (it was published directly, the orphan up to RETRY_AFTER later:
    found by a review)."""
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
        await relays_leave([a], [device])  # a's relay swept the orphan, met QueueMismatch
        # The operator does what the error says: deletes the classic queue.
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(name)  # Delete-Ok: gone for every connection
        later = await a.enqueue(device, b"new", LONG)  # declares a quorum queue, publishes
        got = await take(a, device, {b"orphan", b"new"}, 15)
        assert [p for _, p in got] == [b"orphan", b"new"], got
        assert later
