"""A channel close the broker does not answer in time must not take the connection with it.

aiormq answers a cancelled ``Channel.Close`` with a second one; RabbitMQ takes that for a frame
on a closed channel and closes the whole connection ("CHANNEL_ERROR - expected
'channel.open'"), every stream and drain of the store with it. Seen in the reconnect storm
under load (2,000 streams closing at once through one connection), each close bounded by
``publish_timeout``. Here the broker's answers are held back past the bound instead.
"""

from __future__ import annotations

import asyncio

import aio_pika

from amqp_queue.channel_closing import close_channel
from amqp_queue.settlement import settle
from tests.tcp_proxy import StallProxy

BOUND = 0.3


async def test_a_close_not_answered_in_time_leaves_the_connection_open() -> None:
    async with StallProxy(5672) as broker:
        connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{broker.port}/")
        try:
            closing = await connection.channel()
            other = await connection.channel()
            broker.stall(replies_only=True)
            started = asyncio.get_running_loop().time()
            await close_channel(closing, BOUND, "a channel closing on a stalled link")
            waited = asyncio.get_running_loop().time() - started
            broker.resume()
            await asyncio.sleep(1.0)  # the held answers, and whatever the client sent since

            assert waited < BOUND + 0.5, f"the close held its caller {waited:.1f} s"
            assert not connection.is_closed, "the broker closed the whole connection"
            queue = await other.declare_queue(exclusive=True)
            assert queue.name
        finally:
            await connection.close()


async def test_a_message_settled_while_its_channel_closes_leaves_the_connection_open() -> None:
    """A delivery mark that lands after its stream began closing the channel (the index was
    slow) acks on it: the ack is left out, and the broker requeues the message instead."""
    async with StallProxy(5672) as broker:
        connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{broker.port}/")
        try:
            channel = await connection.channel()
            other = await connection.channel()
            queue = await channel.declare_queue(exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"x"), queue.name)
            message = await queue.get(timeout=5)
            assert message is not None
            broker.stall(replies_only=True)
            closing = asyncio.create_task(close_channel(channel, BOUND, "a closing channel"))
            await asyncio.sleep(0.05)  # the Close is on its way
            await settle(message, ack=True)
            await closing
            broker.resume()
            await asyncio.sleep(1.0)

            assert not connection.is_closed, "the broker closed the whole connection"
            declared = await other.declare_queue(exclusive=True)
            assert declared.name
        finally:
            await connection.close()
