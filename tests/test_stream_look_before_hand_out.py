"""A stream looks at the index again when it dropped stale messages before a hand-out.

A window of messages is checked against the index in one read; the stream then acks the
window's stale messages (superseded, cancelled, expired) and hands out its first live
command. The acks wait on the broker, and a cancel that returned meanwhile was not seen: the
loop body got the command after its cancel had returned (a helper's probe of consumers
killed and restarted under load: 13 to 109 ms after a replacement or cancel returned, where
the README's rule 5 speaks of milliseconds). Here an observer cancels the window's live
command as the stream begins to drop its stale ones, and the acks of the stale ones wait
until the cancel returned: on every backend the cancel lands while the stream drops them
(left to chance, only the memory index's cancel was quick enough to).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from aio_pika.abc import AbstractIncomingMessage

from amqp_queue import Observer, settlement
from amqp_queue.store import RabbitMQStore
from tests.rabbitmq_support import rabbitmq_store
from tests.test_adversarial_seams import BACKENDS, state_url_for

pytestmark = pytest.mark.timeout(30)


class _CancelOnDrop(Observer):
    """Cancels ``target`` (once) when the stream drops stale messages."""

    def __init__(self) -> None:
        self.store: RabbitMQStore | None = None
        self.target: str | None = None
        self.cancelling: asyncio.Task[None] | None = None
        self.returned_at: float | None = None
        self.returned = asyncio.Event()

    def dropped(self, count: int) -> None:
        if self.target is not None and self.cancelling is None:
            self.cancelling = asyncio.create_task(self._cancel(self.target))

    async def _cancel(self, command_id: str) -> None:
        assert self.store is not None
        await self.store.cancel_command(command_id)
        self.returned_at = time.monotonic()
        self.returned.set()


@pytest.mark.parametrize("backend", ["memory", *BACKENDS])
async def test_a_command_cancelled_while_stale_messages_are_dropped_is_not_handed_out(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = _CancelOnDrop()
    settle = settlement._settle

    async def after_the_cancel(
        message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False
    ) -> None:
        if ack and hook.cancelling is not None:
            await asyncio.wait_for(hook.returned.wait(), 10)
        await settle(message, ack=ack, multiple=multiple)

    monkeypatch.setattr(settlement, "_settle", after_the_cancel)
    async with contextlib.AsyncExitStack() as stack:
        state_url = (
            "memory://"
            if backend == "memory"
            else await stack.enter_async_context(state_url_for(backend, tmp_path))
        )
        store = await stack.enter_async_context(
            rabbitmq_store(tmp_path, state_url=state_url, observer=hook)
        )
        hook.store = store
        device = "gw-1"
        target = await store.enqueue(device, b"reboot", 60)
        await store.enqueue_or_update(device, "sp", b"20", 60)
        newest = await store.enqueue_or_update(device, "sp", b"21", 60)  # the first one stale
        hook.target = target
        async with store.consume(device) as commands:
            first = await asyncio.wait_for(anext(commands), 5)
            handed_at = time.monotonic()
        assert hook.cancelling is not None, "no stale message was dropped: nothing tested"
        await hook.cancelling
        assert hook.returned_at is not None
        if first.id == target:
            assert hook.returned_at > handed_at, (
                f"handed out {1000 * (handed_at - hook.returned_at):.1f} ms after its cancel "
                "returned"
            )
        else:
            assert first.id == newest
