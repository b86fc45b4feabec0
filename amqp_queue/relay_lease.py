"""The relay lease: which process's outbox relay sweeps every orphan of a shared index.

Several processes on one index each publish what they owe; unpublished commands nobody owes
(orphans: their writer died, or is slower than ``relay_lease``) are published by the one
relay holding this lease, so each is published once. A holder renews it at every pass that
finds orphans, and gives it up when it cannot publish (the broker failing, or queues that
refuse its configuration: :mod:`amqp_queue.foreign_queues`), so another relay sweeps now.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from amqp_queue.config import RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.state.errors import StateError

logger = logging.getLogger("amqp_queue.outbox")

# The shortest relay lease: a holder renews it at every pass that finds orphans.
_LEASE_MIN = 5.0


class RelayLease:
    """This relay's part in the lease: whether it holds it, and whether it must leave it."""

    def __init__(self, state: DeliveryIndex, config: RabbitMQConfig) -> None:
        self._state = state
        # Who it is in the lease (an operator sees where it runs).
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.seconds = max(2 * config.relay_lease, _LEASE_MIN)
        """How long a take or renewal holds it."""
        self._leaving = False
        self._left = False

    def new_flush(self) -> None:
        """A flush begins: a lease left in the last one may be taken again."""
        self._left = False

    async def take(self) -> bool:
        """Takes or renews the lease; False while another holds it, or this relay left it
        during the flush under way (it could not publish some orphans)."""
        if self._left:
            return False
        self.held = await self._state.hold_relay(self._holder, self.seconds)
        return self.held

    def leave_after_pass(self) -> None:
        """Gives the lease up once this pass's publishes are done (:meth:`pass_done`):
        orphans were left for a process that can publish them."""
        self._leaving = True

    async def pass_done(self) -> None:
        if self._leaving:
            self._left = True
            await self.give_up()

    async def give_up(self) -> None:
        """Frees the lease if this relay holds it, so another sweeps now, not after it."""
        self._leaving = False
        if self.held:
            self.held = False
            try:
                await self._state.hold_relay(self._holder, 0)
            except StateError as exc:
                logger.warning("giving up the relay lease failed (it lapses by itself): %s", exc)
