"""What a store has running on its broker: consume streams and drains, ended together by close."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine
from typing import Any

from amqp_queue.inbox import Inbox
from amqp_queue.stream import CommandStream

CLOSE_GRACE = 2.0
"""Seconds ``end`` gives a running ``consume`` loop body to finish its command."""


class RunningDeliveries:
    """The streams and drains of one store, so that its close can end them promptly."""

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[CommandStream] = weakref.WeakSet()
        self._drains: set[Inbox] = set()
        self._background: set[asyncio.Task[None]] = set()

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs clean-up work (closing a drain's channel) that no caller waits for."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self) -> None:
        """Waits for the clean-up work still running (it bounds and logs its own failures)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def stream(self, stream: CommandStream) -> CommandStream:
        self._streams.add(stream)
        return stream

    def drain_started(self, inbox: Inbox) -> None:
        self._drains.add(inbox)

    def drain_ended(self, inbox: Inbox) -> None:
        self._drains.discard(inbox)

    async def end(self) -> None:
        """Drains return what they claimed; a stream waiting for a command ends, and one whose
        loop body runs ends when it asks for the next, or after :data:`CLOSE_GRACE` seconds
        with its command requeued."""
        for inbox in list(self._drains):
            inbox.interrupt()
        streams = list(self._streams)
        for stream in streams:
            stream.interrupt()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE
        while any(stream.running for stream in streams) or self._drains:
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        for stream in streams:
            await stream.close()
