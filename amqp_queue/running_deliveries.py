"""What a store has running on its broker: consume streams and drains, ended together by close."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from amqp_queue.inbox import Inbox
from amqp_queue.stream import CommandStream

CLOSE_GRACE = 2.0
"""Seconds ``end`` gives a running ``consume`` loop body to finish its command."""


class RunningDeliveries:
    """The streams and drains of one store, so that its close can end them promptly."""

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[CommandStream] = weakref.WeakSet()
        self._drains: set[RunningDrain] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._closing = False

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

    @contextmanager
    def drain(self) -> Iterator[RunningDrain]:
        """Counts a drain as running from the call's first step to its last.

        Registered before its first await: a close that starts while the drain is still
        setting up (starting the store, flushing the outbox, opening its channel and
        consumer) waits for it too, instead of closing the connection and the index under
        it, which left it waiting for the connection for ever or giving back its claims to
        a closed index (so they stayed delivered to nobody).
        """
        drain = RunningDrain(self)
        self._drains.add(drain)
        try:
            yield drain
        finally:
            self._drains.discard(drain)
            drain.finished.set_result(None)

    async def end(self, drain_grace: float) -> None:
        """Drains return what they claimed; a stream waiting for a command ends, and one whose
        loop body runs ends when it asks for the next, or after :data:`CLOSE_GRACE` seconds
        with its command requeued.

        Drains are waited for up to ``drain_grace`` seconds: the index and the broker are
        still open meanwhile, so the windows they are settling are settled, or given back.
        """
        self._closing = True
        for drain in list(self._drains):
            drain.interrupt()
        streams = list(self._streams)
        for stream in streams:
            stream.interrupt()
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + CLOSE_GRACE
        while any(stream.running for stream in streams):
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        # Together: each may wait up to publish_timeout for its delivery marks.
        await asyncio.gather(*(stream.close() for stream in streams))
        await self.wait_drains(max(CLOSE_GRACE, drain_grace) - (loop.time() - started))

    async def wait_drains(self, grace: float) -> None:
        """Waits up to ``grace`` seconds for the drains still running to end."""
        running = [drain.finished for drain in self._drains]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)

    @property
    def closing(self) -> bool:
        """Whether the store is closing: a drain whose consumer starts now ends at once."""
        return self._closing

    def ended(self) -> None:
        """The store has closed: a later start serves drains again."""
        self._closing = False


class RunningDrain:
    """One drain of the store, from its first step; its consumer once it has one."""

    def __init__(self, running: RunningDeliveries) -> None:
        self._running = running
        self.inbox: Inbox | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def consuming(self, inbox: Inbox) -> None:
        """The drain's consumer has started; interrupted at once if the store is closing."""
        self.inbox = inbox
        if self._running.closing:
            inbox.interrupt()

    def interrupt(self) -> None:
        if self.inbox is not None:
            self.inbox.interrupt()
