"""Giving back what a drain claimed and nobody received (the drain was cancelled): each
command open again as before the claim, unless rule 3 or its TTL ended it meanwhile."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from . import rules
from .clock import Clock
from .fleet import Change
from .model import CommandRecord


class GiveBack:
    """``IndexedStore.release`` (a mixin of :class:`~amqp_queue.state.indexed_store.IndexedStore`,
    which provides the primitives it runs on)."""

    clock: Clock

    if TYPE_CHECKING:  # provided by IndexedStore and its backends

        async def get(self, command_id: str) -> CommandRecord | None: ...

        async def modify(self, command_id: str, change: Change) -> CommandRecord: ...

        async def _release(self, command_ids: Collection[str], *, unpublish: bool) -> int: ...

    async def release(self, requeued: Collection[str], republish: Collection[str]) -> int:
        """Gives back commands a drain claimed and nobody received (the drain was cancelled).

        Each delivered command is open again, as it was before the claim (``requeued``: its
        message is back in the queue) or unpublished (``republish``: its message is gone, so
        the outbox publishes it again). One that expired meanwhile ends ``EXPIRED``; one whose
        ``(device_id, command_type)`` slot a newer command took meanwhile ends
        ``SUPERSEDED`` (rule 3). Commands that are not delivered, or have an outcome (proof the
        device took them), are left alone.

        Returns:
            How many commands are open again.
        """
        older = await self._older_of_a_slot([*requeued, *republish])
        now = self.clock()
        for command_id in older:
            # A newer command of its type was given back too: that one is the latest intent.
            await self.modify(
                command_id,
                lambda record: (
                    rules.released(record, now, slot_taken=True, unpublish=False)
                    if record.delivered and record.outcome is None
                    else None
                ),
            )
        requeued = [command_id for command_id in requeued if command_id not in older]
        republish = [command_id for command_id in republish if command_id not in older]
        reopened = await self._release(requeued, unpublish=False) if requeued else 0
        if republish:
            reopened += await self._release(republish, unpublish=True)
        return reopened

    async def _older_of_a_slot(self, command_ids: Collection[str]) -> set[str]:
        """Of these ids, the typed ones a newer given-back command of the same
        ``(device_id, command_type)`` replaces (rule 3 among the given-back themselves)."""
        newest: dict[tuple[str, str], CommandRecord] = {}
        older: set[str] = set()
        for command_id in command_ids:
            record = await self.get(command_id)
            if record is None or record.command_type is None or not record.delivered:
                continue
            if record.outcome is not None:
                continue
            slot = (record.device_id, record.command_type)
            kept = newest.get(slot)
            if kept is None or record.created_at >= kept.created_at:
                if kept is not None:
                    older.add(kept.id)
                newest[slot] = record
            else:
                older.add(record.id)
        return older
