"""What the delivery side needs of the state index: one narrow Protocol, declared here.

Publishing, the outbox relay, ``consume`` and ``drain`` reach the index only through
:class:`DeliveryIndex`; every :class:`~amqp_queue.state.indexed_store.IndexedStore` backend
satisfies it. The operator calls of the contract (confirm, cancel, cleanup, listings) go to
the index as a whole, in :class:`~amqp_queue.store.RabbitMQStore`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from amqp_queue.state.clock import Clock
from amqp_queue.state.model import CommandRecord


class DeliveryIndex(Protocol):
    """The index primitives delivery drives; see ``IndexedStore`` for each one's contract."""

    clock: Clock

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        """New commands and the publish marks of earlier ones, in one round trip."""
        ...

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        """Claims these deliverable commands of a device, atomically; returns them. Claimed,
        they stay open to every reader but delivery until :meth:`hand_over`.

        A backend may finish a claim its cancelled caller left (SQLite's writer thread does):
        the caller awaits a cancelled claim to its end and gives back what it took (see
        ``drain.py``)."""
        ...

    async def hand_over(self, claimed: Sequence[CommandRecord]) -> list[CommandRecord]:
        """Marks claimed commands delivered; returns those still the claim's (not cancelled,
        replaced or expired since). A cancelled caller awaits it as it does a claim."""
        ...

    async def end_claims(self, command_ids: Collection[str]) -> int:
        """Ends the claims on these open commands (their drain is presumed dead)."""
        ...

    async def release(
        self, requeued: Sequence[CommandRecord], republish: Sequence[CommandRecord]
    ) -> int:
        """Opens claimed or handed-over commands nobody received again (a cancelled drain)."""
        ...

    async def cancel(self, command_id: str, *, by: str | None = None) -> CommandRecord:
        """Cancels an open command (what retiring its device does to it)."""
        ...

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        """Of these ids, the commands that are open, ready and unexpired now."""
        ...

    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        """A device's open, unexpired commands in write order."""
        ...

    async def is_deliverable(self, command_id: str) -> bool:
        """Whether one command is open, ready and unexpired now."""
        ...

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        """Marks open commands delivered (a device took them)."""
        ...

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        """The outbox: ready commands not yet published, in ready order."""
        ...

    async def mark_published(self, command_ids: Collection[str]) -> None:
        """Records that the broker confirmed these commands."""
        ...

    async def reject(self, command_ids: Collection[str]) -> int:
        """Ends open commands the broker refused for good."""
        ...

    async def claim_outbox(self, owner: str) -> None:
        """Makes ``owner`` the one publisher of this index's outbox."""
        ...

    async def hold_relay(self, holder: str, seconds: float) -> bool:
        """Takes or renews the lease on sweeping other processes' unpublished commands."""
        ...
