"""A ``consume`` stream whose store closes while the stream is still opening its consumer.

``close()`` closes the stream's channel under the consumer's set-up: aiormq then cancels the
set-up's pending RPC, and the ``CancelledError`` came out of ``async with store.consume()`` in
a task nobody had cancelled (an adversarial test saw it under load), or the set-up waited for
ever on the closed channel. Now close() cancels the set-up and the stream just ends: it hands
out nothing and its loop ends at once, with ``async with`` or iterated directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import RabbitMQStore
from amqp_queue import inbox as inbox_module
from amqp_queue import stream as stream_module
from tests.rabbitmq_support import rabbitmq_store


def _never_opens(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The consumer's set-up waits until cancelled; the event tells it has begun."""
    opening = asyncio.Event()

    async def stuck(*args: Any, **kwargs: Any) -> inbox_module.Inbox:
        opening.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(stream_module, "open_inbox", stuck)
    return opening


async def _closed_while_opening(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    device: Callable[[RabbitMQStore, list[bytes]], Coroutine[Any, Any, None]],
) -> None:
    opening = _never_opens(monkeypatch)
    async with rabbitmq_store(tmp_path) as store:
        await store.enqueue("gw-1", b"one", 600)
        handed: list[bytes] = []
        consuming = asyncio.create_task(device(store, handed))
        await asyncio.wait_for(opening.wait(), 5)
        await asyncio.wait_for(store.close(), 10)
        await asyncio.wait([consuming], timeout=5)
        assert consuming.done()
        assert not consuming.cancelled(), "the stream's opening leaked a CancelledError"
        error = consuming.exception()
        assert error is None, repr(error)
        assert handed == []


async def test_a_stream_whose_store_closes_while_it_opens_ends_without_a_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def device(store: RabbitMQStore, handed: list[bytes]) -> None:
        async with store.consume("gw-1") as stream:
            async for command in stream:
                handed.append(command.payload)

    await _closed_while_opening(tmp_path, monkeypatch, device)


async def test_a_stream_iterated_without_async_with_ends_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def device(store: RabbitMQStore, handed: list[bytes]) -> None:
        async for command in store.consume("gw-1"):
            handed.append(command.payload)

    await _closed_while_opening(tmp_path, monkeypatch, device)
