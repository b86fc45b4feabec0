"""Group commit: concurrent callers share one round trip to the state index.

One SQLAlchemy commit over aiosqlite costs about as much as a hundred broker publishes in
flight, so concurrent enqueues wait for the commit already under way and then share the next
one instead of each paying for their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

Item = TypeVar("Item")

Refusals = Mapping[int, BaseException] | None
"""What a flush may return: the exception of each item (by its index in the batch) that
failed alone while the rest of the batch went through."""


class Batcher(Generic[Item]):
    """Feeds submitted items to ``flush`` in batches; each caller learns its batch's outcome.

    While one flush runs, new submissions gather; the next flush takes them all (up to
    ``max_batch``). A failed flush fails every caller of that batch with its exception; a
    flush that returns :data:`Refusals` fails only those items' callers.
    """

    def __init__(
        self,
        flush: Callable[[list[Item]], Awaitable[Refusals]],
        *,
        max_batch: int,
        on_detached_failure: Callable[[BaseException], None] | None = None,
        linger: float = 0.0,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._on_detached_failure = on_detached_failure
        self._linger = linger
        self._waiting: list[tuple[Item, asyncio.Future[None] | None]] = []
        self._worker: asyncio.Task[None] | None = None
        self._lingering: asyncio.TimerHandle | None = None
        # Items queued and flushed so far, and the drains waiting for a count to be flushed.
        self._queued = 0
        self._flushed = 0
        self._drains: list[tuple[int, asyncio.Future[None]]] = []

    async def submit(self, item: Item) -> None:
        """Waits until ``item`` has been flushed; raises what its batch's flush raised."""
        await self.post(item)

    def post(self, item: Item) -> asyncio.Future[None]:
        """Queues ``item`` and returns the future of its flush without waiting for it."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(item, done)
        return done

    def post_detached(self, item: Item) -> None:
        """Queues ``item`` with nobody waiting: a failed flush goes to ``on_detached_failure``
        once per batch (no future per item, for items posted by the thousand).

        With a ``linger``, the item waits up to that many seconds for an item somebody
        waits for, and rides along with its flush: with nothing else going on, a detached
        item flushed at once is a round trip of its own that the next caller waits behind.
        """
        if not self._linger:
            self._queue(item, None)
            return
        self._waiting.append((item, None))
        self._queued += 1
        if self._lingering is None and (self._worker is None or self._worker.done()):
            loop = asyncio.get_running_loop()
            self._lingering = loop.call_later(self._linger, self._start)

    def withdraw(self, done: asyncio.Future[None]) -> bool:
        """Takes back the item of ``done`` if no flush has taken it yet (its future is then
        cancelled); False once a flush has it, or it is flushed."""
        for at, (_, waiting) in enumerate(self._waiting):
            if waiting is done:
                # Its place in queue order (every item before _waiting was taken by a flush):
                # the counts are positions, so a later item must not count as an earlier one
                # flushed. Forgotten instead: a drain that counted it waits for one less.
                place = self._queued - len(self._waiting) + at
                del self._waiting[at]
                self._queued -= 1
                self._drains = [
                    (target - 1 if target > place else target, flushed)
                    for target, flushed in self._drains
                ]
                done.cancel()
                self._wake_drains()
                return True
        return False

    def _queue(self, item: Item, done: asyncio.Future[None] | None) -> None:
        self._waiting.append((item, done))
        self._queued += 1
        self._start()

    def _start(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if self._waiting and (self._worker is None or self._worker.done()):
            self._worker = asyncio.create_task(self._run(), name="amqp_queue.batcher")

    async def drain(self) -> None:
        """Waits until everything submitted so far has been flushed (not what is submitted
        meanwhile: under a steady stream of items the worker never ends)."""
        if self._flushed >= self._queued:
            return
        flushed = asyncio.get_running_loop().create_future()
        self._drains.append((self._queued, flushed))
        self._start()  # what lingers goes now
        await asyncio.shield(flushed)

    def _wake_drains(self, *, every: bool = False) -> None:
        waiting, self._drains = self._drains, []
        for target, flushed in waiting:
            if every or target <= self._flushed:
                if not flushed.done():
                    flushed.set_result(None)
            else:
                self._drains.append((target, flushed))

    async def _run(self) -> None:
        try:
            await self._run_batches()
        finally:
            # Ended (everything flushed, or the task cancelled): nobody waits for ever.
            self._wake_drains(every=True)

    async def _run_batches(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            try:
                refused = await self._flush([item for item, _ in batch]) or {}
            except Exception as exc:
                for _, done in batch:
                    if done is not None and not done.done():
                        done.set_exception(exc)
                if self._on_detached_failure is not None and any(d is None for _, d in batch):
                    self._on_detached_failure(exc)
            else:
                for index, (_, done) in enumerate(batch):
                    if done is None or done.done():
                        continue
                    if index in refused:
                        done.set_exception(refused[index])
                    else:
                        done.set_result(None)
            self._flushed += len(batch)
            self._wake_drains()
