"""The outbox relay: publishes ready commands the broker has not confirmed yet.

A command is written to the state index first and published after. When the publish fails
(broker down, connection cut, confirm timed out) the command stays in the index with no
``published_at``; the relay publishes it once the broker is back: at start-up, when the
connection is restored, when a publish fails, and every ``relay_interval`` seconds.
A publish whose confirm was lost may be published twice; the copy is dropped at delivery,
because only a live command id is ever handed to a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from amqp_queue.config import RabbitMQConfig
from amqp_queue.publisher import Publisher
from state.base import IndexedStore
from state.errors import BrokerError, StateError

logger = logging.getLogger("amqp_queue.outbox")


class OutboxRelay:
    """Publishes unpublished ready commands, retrying with backoff until the broker is back."""

    def __init__(self, state: IndexedStore, publisher: Publisher, config: RabbitMQConfig) -> None:
        self._state = state
        self._publisher = publisher
        self._config = config
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.pending = True
        """Whether this process knows of, or may hold, unpublished commands."""
        self._kicks = 0

    def kick(self) -> None:
        """Asks for a pass soon (a publish failed, the connection came back, or a command
        was left behind the backlog)."""
        self.pending = True
        self._kicks += 1
        self._wake.set()

    def _settled(self, kicks_before_read: int) -> bool:
        """Clears ``pending`` unless a kick came after the pass's last read began.

        A command that kicked after that read was committed too late for it; clearing
        ``pending`` then would let the next command be published directly, ahead of it.
        """
        if self._kicks != kicks_before_read:
            return False
        self.pending = False
        return True

    async def flush(self) -> int:
        """Publishes every unpublished ready command now; returns how many were published.

        Raises:
            BrokerError: a publish failed; what was published before it stays published.
            StateError: the index could not be read or updated.
        """
        async with self._lock:
            published = 0
            while True:
                kicks = self._kicks
                records = await self._state.unpublished(self._config.relay_batch)
                if not records:
                    if self._settled(kicks):
                        return published
                    continue
                results = await asyncio.gather(
                    *(self._publisher.publish(record) for record in records),
                    return_exceptions=True,
                )
                done = [
                    record.id
                    for record, result in zip(records, results, strict=True)
                    if result is True
                ]
                await self._state.mark_published(done)
                published += len(done)
                failures = [result for result in results if isinstance(result, BaseException)]
                if failures:
                    raise BrokerError(
                        f"outbox: {len(failures)} of {len(records)} publishes failed"
                    ) from failures[0]
                if all(result is False for result in results) and self._settled(kicks):
                    # Everything left expired while waiting; nothing more can be published.
                    return published

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="amqp_queue.outbox")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _backoff(self, seconds: float) -> None:
        """Sleeps between retries, cut short by a kick (the connection came back)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._config.relay_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((BrokerError, StateError)),
                wait=wait_exponential_jitter(multiplier=0.2, max=10.0),
                sleep=self._backoff,
                before_sleep=before_sleep_log(logger, logging.WARNING),
                reraise=True,
            ):
                with attempt:
                    published = await self.flush()
            if published:
                logger.info("outbox relay published %d commands", published)
