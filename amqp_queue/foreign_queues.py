"""Device queues the broker holds with other settings than this store's configuration.

A :class:`~amqp_queue.errors.QueueMismatch` is a fault of the store's ``RabbitMQConfig``
(another process declared the queue as a quorum queue where this one says classic, or the
other way round), not of the command: any process configured like the queue publishes it.
So a command whose publish met one is neither rejected nor marked; it stays unpublished in
the index, and this process's relay leaves it, and the relay lease, to one that can publish
it. The relay tries such a device again after :data:`RETRY_AFTER` seconds, in case the queue
was deleted meanwhile (which is what the error tells an operator to do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from amqp_queue.errors import QueueMismatch
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.outbox")

RETRY_AFTER = 30.0
"""Seconds a relay leaves a device's commands alone after its queue refused this store's
settings."""


class ForeignQueues:
    """The devices whose queue refused this store's settings lately."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._clock = time.monotonic

    def met(self, refused: Iterable[tuple[CommandRecord, QueueMismatch]]) -> set[str]:
        """Notes the refusals; returns the ids of the commands left unpublished."""
        left: set[str] = set()
        for record, refusal in refused:
            if not self.leaves(record.device_id):
                logger.error(
                    "commands to %s are left unpublished for a process whose RabbitMQConfig "
                    "matches the device queue: %s",
                    record.device_id,
                    refusal,
                )
            self._until[record.device_id] = self._clock() + RETRY_AFTER
            left.add(record.id)
        return left

    def leaves(self, device_id: str) -> bool:
        """Whether this relay leaves the device's commands to another (until its retry)."""
        if device_id not in self._until:
            return False
        if self._until[device_id] <= self._clock():
            del self._until[device_id]
            return False
        return True

    def skip(
        self, orphans: list[CommandRecord], owing: set[str]
    ) -> tuple[list[CommandRecord], set[str]]:
        """The orphans this relay may publish, and the devices whose orphans it leaves to
        another. Not those of a device it owes a command to: the queue took that one (it was
        deleted and declared again), and its orphans go out ahead of it."""
        kept = [r for r in orphans if r.device_id in owing or not self.leaves(r.device_id)]
        return kept, {r.device_id for r in orphans} - {r.device_id for r in kept}
