"""A give-back requeues what is unsettled in one frame, also when the channel's newest delivery
was already settled by itself.

Found by a helper's probe of PostgreSQL restarts under drains, which logged "could not requeue
... Message already processed" up to 18 times a run: after an index failure a drain acks some
messages one at a time, and its give-back sent the multiple requeue for the channel's newest
delivery, which aio-pika refuses locally once that delivery is acked, so no frame went out. In
the drain the held messages had gone back one by one before that (``Settlement.release``), so
the cost was the warning; ``Settlement.requeue_all`` itself left anything still held waiting for
the channel to close, which this test shows on a real channel.
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from amqp_queue.settlement import Settlement
from tests.rabbitmq_support import AMQP_URL
from tests.support import eventually, unique


async def _ready_count(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count or 0


async def test_held_messages_go_back_at_once_when_the_newest_delivery_was_acked() -> None:
    name = unique("test.requeue-all.")
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, auto_delete=False)
        try:
            for n in range(3):
                await channel.default_exchange.publish(aio_pika.Message(b"%d" % n), name)
            reader = await connection.channel()
            queue = await reader.get_queue(name)
            got: list[AbstractIncomingMessage] = []
            for _ in range(3):
                message = await queue.get(no_ack=False, timeout=5)
                assert message is not None
                got.append(message)
            settlement = Settlement("dev")
            settlement.hold(got[:2])
            await got[2].ack()  # the newest, settled by itself

            await settlement.requeue_all(got[2])

            async def back() -> bool:
                return await _ready_count(channel, name) >= 2

            await eventually(back, 5)

            assert await _ready_count(channel, name) == 2  # back, with the channel still open
            assert not reader.is_closed
        finally:
            await channel.queue_delete(name)
