"""A publish that times out while it waits its turn on the channel keeps its place.

aiormq sends one publish at a time on a channel and holds it until the frame is written, so
over a congested link publishes wait their turn. A relay pass publishes its batch at once,
each publish bounded by ``publish_timeout``; an earlier command that ran out of time while
it still waited was withdrawn, unsent, and the command behind it got the turn and went out:
published again by the next pass, the earlier one reached the queue after it (a helper's
probe through a throttled link: out of order in 9 of 11 runs, every state backend). Here the
channel is held busy, as a long frame over a slow link holds it, while an earlier command's
time runs out and a later one's does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import aiormq
import pytest

from amqp_queue import BrokerError, RabbitMQStore
from amqp_queue.publisher import Publisher
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 1.0


async def _queued(queue_name: str) -> list[bytes]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        bodies = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies


@asynccontextmanager
async def _busy_channel(store: RabbitMQStore) -> AsyncIterator[Publisher]:
    """The store's publisher, its channel held busy (as a long frame over a slow link holds
    it) until the block ends."""
    publisher, topology = store._publisher, store._topology
    assert publisher is not None
    assert topology is not None
    underlay = await topology.channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    busy, done = asyncio.Event(), asyncio.Event()

    async def long_frame() -> None:
        async with underlay.lock:
            busy.set()
            await done.wait()

    holder = asyncio.create_task(long_frame())
    await busy.wait()
    try:
        yield publisher
    finally:
        done.set()
        await holder


async def test_a_publish_timed_out_waiting_its_turn_still_goes_out_before_the_next(
    tmp_path: Path,
) -> None:
    async with rabbitmq_store(tmp_path, publish_timeout=TIMEOUT) as store:
        device = "gw-1"
        await store.ensure_queue(device)
        first, second = (store.state.build(device, None, body, 60) for body in (b"1", b"2"))
        async with _busy_channel(store) as publisher:
            earlier = asyncio.create_task(publisher.publish(first))
            await asyncio.sleep(TIMEOUT / 3)
            later = asyncio.create_task(publisher.publish(second))
            await asyncio.sleep(TIMEOUT * 5 / 6)  # the first one's time ran out, not the second's
            assert earlier.done()
            with pytest.raises(BrokerError):
                await earlier
            # As the relay's next pass does while the first send still waits: it joins it.
            again = asyncio.create_task(publisher.publish(first))
            await asyncio.sleep(0)
        assert await later
        assert await again
        bodies = await _queued(store.config.queue_name(device))
        assert bodies == [b"1", b"2"], f"the queue holds {bodies}"


async def test_a_send_confirmed_after_its_caller_left_is_not_sent_again(tmp_path: Path) -> None:
    """The relay publishes again what a timed-out publish left owed; a send that went on and
    was confirmed meanwhile is not sent a second time (without a fault, each command is
    published once: a loaded run of the suite saw 205 copies of a 1,100-device rollout)."""
    async with rabbitmq_store(tmp_path, publish_timeout=TIMEOUT) as store:
        device = "gw-1"
        await store.ensure_queue(device)
        record = store.state.build(device, None, b"1", 60)
        async with _busy_channel(store) as publisher:
            with pytest.raises(BrokerError):
                await publisher.publish(record)  # its time runs out while it waits its turn
        await asyncio.sleep(0.3)  # sent and confirmed, its caller gone
        assert await publisher.publish(record)  # the relay's next pass
        bodies = await _queued(store.config.queue_name(device))
        assert bodies == [b"1"], f"the queue holds {bodies}"
