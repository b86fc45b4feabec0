"""A ``consume()`` loop cut while its consumer is being set up.

The set-up runs to its end by itself (``inbox._uncancelled``): a broker RPC cut half way
closes the channel. The cut caller closes the stream's channel meanwhile. Found by the
twenty-first session's chaos probe ("Task was destroyed but it is pending" for
``inbox._opened``): a set-up that reached its queue declaration after that close waited for
the robust channel to be restored (aio-pika's robust calls do), which a channel closed by its
owner never is, so the set-up never ended; so did one that went on while the close still
waited for the broker. Each step now first looks whether the channel was closed for good
(``channel_closing.usable``), and the set-up ends with the channel's failure. It is not cut
short from outside: a first fix did that, and aiormq closed the channel under the consume
it cut, whose own close then went unanswered for 2 x ``publish_timeout``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aiormq.exceptions import ChannelInvalidStateError

from amqp_queue import RabbitMQStore
from amqp_queue import inbox as inbox_module
from amqp_queue.channel_closing import closed_for_good, usable
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("resumed", ["closed", "closing"])
async def test_a_set_up_cut_after_its_prefetch_ends_once_the_channel_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resumed: str
) -> None:
    """The set-up is held once its prefetch is set, the loop cut, and the set-up resumed
    once the stream's channel is closed, or while its close waits for the broker's answer
    (``is_closed`` is still False then)."""
    armed = asyncio.Event()  # the store's own channels set theirs as it connects
    qos_set = asyncio.Event()
    go_on = asyncio.Event()
    set_ups: list[asyncio.Future[Any]] = []
    set_qos = aio_pika.RobustChannel.set_qos
    close = aio_pika.RobustChannel.close

    async def held_after_qos(channel: aio_pika.RobustChannel, *args: Any, **kwargs: Any) -> Any:
        answer = await set_qos(channel, *args, **kwargs)
        if armed.is_set() and not qos_set.is_set():
            qos_set.set()
            await go_on.wait()
        return answer

    async def resuming_as_it_closes(channel: aio_pika.RobustChannel, *args: Any) -> Any:
        closing = asyncio.ensure_future(close(channel, *args))
        await asyncio.sleep(0)  # begun: Channel.Close sent, its answer not back yet
        if qos_set.is_set() and resumed == "closing":
            go_on.set()
        return await closing

    opened = inbox_module._opened

    def noted(*args: Any) -> Any:
        set_up = asyncio.ensure_future(opened(*args))
        set_ups.append(set_up)
        return set_up

    monkeypatch.setattr(aio_pika.RobustChannel, "set_qos", held_after_qos)
    monkeypatch.setattr(aio_pika.RobustChannel, "close", resuming_as_it_closes)
    monkeypatch.setattr(inbox_module, "_opened", noted)
    async with rabbitmq_store(tmp_path, publish_timeout=2.0) as store:
        assert isinstance(store, RabbitMQStore)
        await store.enqueue("gw-1", b"reboot", 60)
        armed.set()

        async def read_one() -> Any:
            async with store.consume("gw-1") as commands:
                return await anext(commands)

        reading = asyncio.ensure_future(read_one())
        await asyncio.wait_for(qos_set.wait(), 10)
        reading.cancel()
        await asyncio.wait([reading], timeout=10)
        assert reading.cancelled()
        go_on.set()  # the stream and its channel are closed by now
        assert len(set_ups) == 1
        done, _ = await asyncio.wait(set_ups, timeout=5)
        assert done, "the consumer's set-up never ended after its channel closed"
        monkeypatch.undo()
        # The command is the next stream's, once.
        async with store.consume("gw-1") as commands:
            got = await asyncio.wait_for(anext(commands), 10)
        assert got.payload == b"reboot"


async def test_a_robust_channel_is_closed_for_good_as_soon_as_its_close_begins() -> None:
    """aio-pika says so only in attributes of its own, read by ``closed_for_good``: should
    they change, this fails rather than set-ups hanging again."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        other = await connection.channel()
        assert not closed_for_good(channel)
        closing = asyncio.ensure_future(channel.close())
        await asyncio.sleep(0)
        assert closed_for_good(channel)
        await closing
        assert not closed_for_good(other)
    assert closed_for_good(other)  # its connection closed


async def test_a_set_up_step_waits_out_a_restore_and_fails_once_the_channel_is_closed() -> None:
    """aio-pika opens a robust channel again before it has replayed its prefetch and
    declarations, and its calls wait for that replay: ``usable`` returned on the open
    channel, and the next call then waited for ever once the channel was closed meanwhile
    (a reviewer's probe held the replay). Here the replay is made to look unfinished."""
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        restored: asyncio.Event = channel._RobustChannel__restored  # type: ignore[attr-defined]
        restored.clear()
        waiting = asyncio.ensure_future(usable(channel))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "usable() returned while the channel was being restored"
        await channel.close()
        with pytest.raises(ChannelInvalidStateError):
            await asyncio.wait_for(waiting, 2)
