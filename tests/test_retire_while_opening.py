"""A stream or drain opening while another store retires the device.

Seen under load in the test command (``test_retire_device_racing_a_stream_and_an_enqueuer``):
the retire deleted the queue between the stream's declaration of it and its binding, and
``consume`` failed with ``BrokerError`` (NOT_FOUND). The queue a retire deletes is declared
again by the next enqueue, as a new, empty queue: a stream or drain opening at that moment
opens on it. Here the retire lands at that exact moment (run from the binding).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika.queue
import pytest

from amqp_queue import RabbitMQStore
from tests.test_adversarial_seams import BACKENDS, LONG, Env, env_on


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async with env_on(request.param, tmp_path, prefix="retire.") as shared:
        yield shared


def retire_before_the_next_bind(
    monkeypatch: pytest.MonkeyPatch, retire: Callable[[], Any]
) -> list[int]:
    """The next queue binding first runs ``retire()`` (once); how many retired."""
    bind = aio_pika.queue.Queue.bind
    retired: list[int] = []

    async def retire_then_bind(queue: aio_pika.queue.Queue, *args: Any, **kwargs: Any) -> Any:
        if not retired:
            retired.append(await retire())
        return await bind(queue, *args, **kwargs)

    monkeypatch.setattr(aio_pika.queue.Queue, "bind", retire_then_bind)
    return retired


async def test_a_stream_opening_as_the_device_is_retired_opens_on_the_new_queue(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = env.device()
    a = await env.open()
    b = await env.open()
    old = await a.enqueue(device, b"before the retire", LONG)
    retired = retire_before_the_next_bind(monkeypatch, lambda: a.retire_device(device))
    async with b.consume(device) as stream:
        opening = asyncio.ensure_future(stream.__anext__())
        await asyncio.wait([opening], timeout=3)
        assert retired == [1]
        monkeypatch.undo()
        new = await a.enqueue(device, b"after the retire", LONG)
        got = await asyncio.wait_for(opening, 10)

    assert got.id == new
    assert (await a.get_status(old)).value == "cancelled"


async def test_a_drain_opening_as_the_device_is_retired_drains_the_new_queue(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = env.device()
    a = await env.open()
    b: RabbitMQStore = await env.open()
    await a.enqueue(device, b"before the retire", LONG)
    retired = retire_before_the_next_bind(monkeypatch, lambda: a.retire_device(device))

    assert await asyncio.wait_for(b.drain_pending(device), 10) == []
    assert retired == [1]
    monkeypatch.undo()
    await a.enqueue(device, b"after the retire", LONG)
    assert await b.drain_pending(device) == [b"after the retire"]
