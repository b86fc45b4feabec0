"""A ``consume()`` stream ends with ``aclose()`` as an async generator does (so
``contextlib.aclosing`` works), and a second ``close()`` waits for the first.

Found by a helper's probe: ``CommandStream`` had no ``aclose()``, so ``contextlib.aclosing``
raised ``AttributeError`` and the stream kept its channel and the device's prefetched
messages until the store closed (another stream of the device got nothing, and the command
whose loop body finished stayed PENDING). And a ``close()`` while another task's close of
the same stream ran returned at once: the store's close then closed the channel under it,
logging requeue failures.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, RabbitMQStore
from tests.rabbitmq_support import rabbitmq_store


async def test_aclosing_after_a_break_finishes_the_command_and_frees_the_rest(
    tmp_path: Path,
) -> None:
    async with rabbitmq_store(tmp_path) as store:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(3)]
        async with contextlib.aclosing(store.consume("dev-1")) as stream:
            async for command in stream:
                first = command.id
                break
        assert first == ids[0]
        assert await store.get_status(ids[0]) == CommandStatus.DELIVERED
        async with asyncio.timeout(10), store.consume("dev-1") as again:
            rest = [(await anext(again)).id, (await anext(again)).id]
        assert rest == ids[1:]


async def test_aclosing_a_stream_whose_body_raised_requeues_the_command(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        command_id = await store.enqueue("dev-1", b"c", 600)
        with pytest.raises(RuntimeError, match="body failed"):
            await _consume_with_a_body_that_raises(store)
        assert await store.get_status(command_id) == CommandStatus.PENDING
        async with asyncio.timeout(10), store.consume("dev-1") as again:
            assert (await anext(again)).id == command_id


async def _consume_with_a_body_that_raises(store: RabbitMQStore) -> None:
    async with contextlib.aclosing(store.consume("dev-1")) as stream:
        async for _ in stream:
            raise RuntimeError("body failed")


async def test_a_second_close_waits_for_the_first(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        await store.enqueue("dev-1", b"c", 600)
        stream = store.consume("dev-1")
        await anext(stream)
        first = asyncio.ensure_future(stream.close())
        await asyncio.sleep(0)  # the first close is under way, waiting for the broker
        assert not first.done()
        await stream.close()
        assert first.done()
        await first
