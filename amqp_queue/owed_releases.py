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
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.outbox")

RETRY_FIRST, RETRY_MOST = 0.2, 5.0
"""Seconds between the relay's tries while the index refuses a release: doubling from the
first to the most. Meanwhile a handed-over command reads delivered to nobody, so the relay
does not wait for its next regular pass (``relay_interval``, 30 s by default)."""


class OwedReleases:
    """The claimed or handed-over commands owed a release (by id, as their drain's records
    name their claims), until the index takes it."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, object], CommandRecord] = {}
        self._refused = 0  # tries the index refused in a row
        self.retry_in = RETRY_FIRST
        """Seconds until the relay should try again (see :data:`RETRY_MOST`)."""

    def __len__(self) -> int:
        return len(self._records)

    def add(self, claimed: Iterable[CommandRecord]) -> None:
        self._records.update(((record.id, record.claimed_until), record) for record in claimed)

    async def release(self, state: DeliveryIndex, *, within: float = 0.0) -> set[str] | None:
        """Releases them all unpublished, trying for ``within`` seconds; returns the ids
        released (to publish again), or None when the index refused (logged, kept)."""
        releasing = dict(self._records)
        if not releasing:
            return set()
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(StateError),
                stop=stop_after_delay(within),
                wait=wait_fixed(0.2),
                reraise=True,
            ):
                with attempt:
                    await state.release((), list(releasing.values()))
        except StateError as exc:
            logger.warning("giving back %d claimed commands failed: %s", len(releasing), exc)
            self.retry_in = min(RETRY_FIRST * 2**self._refused, RETRY_MOST)
            self._refused += 1
            return None
        self._refused, self.retry_in = 0, RETRY_FIRST
        for key in releasing:
            self._records.pop(key, None)
        return {command_id for command_id, _ in releasing}
