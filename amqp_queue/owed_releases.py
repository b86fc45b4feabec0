"""Claimed commands a cancelled drain could not give back, which the outbox relay gives back.

A drain claims commands and, just before it hands them over, marks them delivered;
cancelled, it gives them back. When the index refuses that for longer than the drain may wait,
the requeued messages of handed-over commands are dropped as delivered by whoever reads them
next, so the relay takes their release on
(:meth:`~amqp_queue.outbox.OutboxRelay.owe_release`): it releases them unpublished and
publishes them again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.state.errors import StateError

logger = logging.getLogger("amqp_queue.outbox")


class OwedReleases:
    """The ids owed a release, until the index takes it."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, command_ids: Iterable[str]) -> None:
        self._ids.update(command_ids)

    async def release(self, state: DeliveryIndex, *, within: float = 0.0) -> set[str] | None:
        """Releases them all unpublished, trying for ``within`` seconds; returns the ids
        released (to publish again), or None when the index refused (logged, kept)."""
        releasing = set(self._ids)
        if not releasing:
            return releasing
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(StateError),
                stop=stop_after_delay(within),
                wait=wait_fixed(0.2),
                reraise=True,
            ):
                with attempt:
                    await state.release((), releasing)
        except StateError as exc:
            logger.warning("giving back %d claimed commands failed: %s", len(releasing), exc)
            return None
        self._ids -= releasing
        return releasing
