"""One channel's acks and requeues go out in the order they began, also when the caller of
one was cancelled while it was being sent.

Found by a review helper: after the acks of a cancelled call were made to run to their end
(8c15f75), a stale message's single ack, still waiting on a busy connection's writer, went out
after the multiple ack that a later hand-out's mark sent for the whole window, which had
covered it: the broker answered ``406 PRECONDITION_FAILED - unknown delivery tag`` and closed
the stream's channel (everything unacked came again; nothing was lost, but a closed channel is
what amqp_queue.channel_closing exists to avoid).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from amqp_queue.channel_closing import close_channel
from amqp_queue.settlement import settle
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store
from tests.support import unique


async def test_a_stale_ack_cut_short_is_not_overtaken_by_the_windows_multiple_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rabbitmq_store(tmp_path, prefetch=10) as store:
        device = "dev-order"
        stale = [await store.enqueue(device, b"stale-%d" % n, 600) for n in range(2)]
        for payload in (b"c2", b"c3"):
            await store.enqueue(device, payload, 600)
        for command_id in stale:
            await store.cancel_command(command_id)

        ack = aio_pika.IncomingMessage.ack
        slow = asyncio.Event()

        async def slow_first_stale_ack(
            message: aio_pika.IncomingMessage, multiple: bool = False
        ) -> None:
            await ack(message, multiple)  # the frame is queued here
            if message.message_id == stale[0] and not multiple:
                slow.set()
                await asyncio.sleep(1.0)  # then waits on a busy connection's writer

        closes: list[BaseException | None] = []
        got: list[bytes] = []
        async with store.consume(device) as stream:
            monkeypatch.setattr(aio_pika.IncomingMessage, "ack", slow_first_stale_ack)
            cut = asyncio.ensure_future(stream.__anext__())
            waiting = asyncio.ensure_future(slow.wait())
            await asyncio.wait([cut, waiting], timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert slow.is_set(), "the stale ack was not sent (the scenario needs it)"
            cut.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cut
            channel: Any = stream._channel
            underlay = await channel.get_underlay_channel()
            underlay.closing.add_done_callback(
                lambda done: closes.append(None if done.cancelled() else done.exception())
            )
            for _ in range(2):
                got.append((await asyncio.wait_for(stream.__anext__(), 5)).payload)
            with contextlib.suppress(TimeoutError):
                # The next ask marks c3 delivered: the window's one multiple ack.
                await asyncio.wait_for(stream.__anext__(), 1.5)
            await asyncio.sleep(0.5)  # the stale ack's frame, had it gone last
            refused = [c for c in closes if "PRECONDITION_FAILED" in str(c)]

    assert got == [b"c2", b"c3"]
    assert not refused, refused


async def test_a_close_cancelled_while_it_waits_for_the_channels_settles_still_closes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a second review: the close waited for the channel's settles before it began,
    and a caller cancelled in that wait (a deadline around a stream's close) left the channel
    open for good. The wait and the close are one task now, never cancelled."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(unique("test.settle."), auto_delete=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"x", message_id="m"), routing_key=queue.name
        )
        message = await queue.get(timeout=5)
        assert message is not None
        ack = aio_pika.IncomingMessage.ack

        async def busy_writer_ack(
            message: aio_pika.IncomingMessage, multiple: bool = False
        ) -> None:
            await asyncio.sleep(1.0)
            await ack(message, multiple)

        monkeypatch.setattr(aio_pika.IncomingMessage, "ack", busy_writer_ack)
        settling = asyncio.ensure_future(settle(message, ack=True))
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(close_channel(channel, 5.0, "a test channel"))
        await asyncio.sleep(0.1)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        await settling
        for _ in range(50):
            if channel.is_closed:
                break
            await asyncio.sleep(0.1)

        assert channel.is_closed


async def test_settles_leave_nothing_behind_on_their_connection() -> None:
    """Each settle races its frame against the connection's close (``unless_closed``).
    aiormq's ``closing`` makes a new observer on each read, hooked to the connection until
    the observer ends: left running, every settle of a long-lived connection kept about
    1 KB (a review found 3,000 callbacks after 3,000 hand-outs of one stream)."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(unique("test.settle."), auto_delete=True)
        for n in range(50):
            await channel.default_exchange.publish(
                aio_pika.Message(str(n).encode()), routing_key=queue.name
            )
        underlay = await channel.get_underlay_channel()
        closing: Any = underlay.connection._closing  # type: ignore[attr-defined]  # aiormq's own
        hooked = len(closing._callbacks)

        for _ in range(50):
            message = await queue.get(no_ack=False)
            assert message is not None
            await settle(message, ack=True)

        assert len(closing._callbacks) <= hooked + 1
    finally:
        await connection.close()
