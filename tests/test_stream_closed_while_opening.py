"""A ``consume`` stream whose store closes while the stream is still opening its consumer.

``close()`` closes the stream's channel under the consumer's set-up: aiormq then cancels the
set-up's pending RPC, and the ``CancelledError`` came out of ``async with store.consume()`` in
a task nobody had cancelled (an adversarial test saw it under load). The stream now just ends:
closed while it opened, it hands out nothing and its loop ends at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import inbox as inbox_module
from amqp_queue import stream as stream_module
from tests.rabbitmq_support import rabbitmq_store


async def test_a_stream_whose_store_closes_while_it_opens_ends_without_a_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opening = asyncio.Event()
    go_on = asyncio.Event()
    opened = inbox_module.open_inbox

    async def slow_open(*args: Any, **kwargs: Any) -> inbox_module.Inbox:
        opening.set()
        await go_on.wait()  # the channel is closed under it meanwhile
        return await opened(*args, **kwargs)

    monkeypatch.setattr(stream_module, "open_inbox", slow_open)
    async with rabbitmq_store(tmp_path) as store:
        await store.enqueue("gw-1", b"one", 600)
        handed: list[bytes] = []

        async def device() -> None:
            async with store.consume("gw-1") as stream:
                async for command in stream:
                    handed.append(command.payload)

        consuming = asyncio.create_task(device())
        await asyncio.wait_for(opening.wait(), 5)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.2)  # close() has closed the stream's channel
        go_on.set()
        await asyncio.wait_for(closing, 10)
        await asyncio.wait([consuming], timeout=5)
        assert consuming.done()
        assert not consuming.cancelled(), "the stream's opening leaked a CancelledError"
        error = consuming.exception()
        assert error is None, repr(error)
        assert handed == []
