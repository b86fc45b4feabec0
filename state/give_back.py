"""Giving back what a drain claimed and nobody received (the drain was cancelled): each
command open again as before the claim, unless rule 3 or its TTL ended it meanwhile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
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

        async def _release(self, claims: Mapping[str, datetime], *, unpublish: bool) -> int: ...

    async def release(
        self, requeued: Sequence[CommandRecord], republish: Sequence[CommandRecord]
    ) -> int:
        """Gives back commands a drain claimed and nobody received (the drain was cancelled):
        ``requeued`` and ``republish`` are the drain's records, as its claim or hand-over
        returned them. Only what is still that claim's is given back: each command's
        ``claimed_until`` must be the record's (a claim ended by a reader, or lapsed and
        taken by another drain, is theirs, and so is what they delivered).

        A command still claimed and open is unclaimed; one a drain's hand-over delivered is
        open again, as it was before the claim (``requeued``: its message is back in the
        queue) or unpublished (``republish``: its message is gone, so the outbox publishes it
        again). One that expired meanwhile ends ``EXPIRED``; one whose ``(device_id,
        command_type)`` slot a newer command took meanwhile ends ``SUPERSEDED`` (rule 3).
        Commands a device's mark delivered (a stream), or with an outcome (proof the device
        took them), or ended otherwise, are left alone.

        Returns:
            How many commands are open again.
        """
        given = {record.id: record.claimed_until for record in [*requeued, *republish]}
        older = await self._older_of_a_slot(given)
        now = self.clock()
        for command_id in older:
            # A newer command of its type was given back too: that one is the latest intent.
            await self.modify(
                command_id,
                lambda record: (
                    rules.released(record, now, slot_taken=True, unpublish=False)
                    if rules.given_back_delivered(record)
                    and record.claimed_until == given[record.id]
                    else None
                ),
            )
        back = {
            record.id: record.claimed_until
            for record in requeued
            if record.claimed_until is not None and record.id not in older
        }
        again = {
            record.id: record.claimed_until
            for record in republish
            if record.claimed_until is not None and record.id not in older
        }
        reopened = await self._release(back, unpublish=False) if back else 0
        if again:
            reopened += await self._release(again, unpublish=True)
        return reopened

    async def _older_of_a_slot(self, given: Mapping[str, datetime | None]) -> set[str]:
        """Of these ids (with the claims they are given back under), the typed ones a newer
        given-back command of the same ``(device_id, command_type)`` replaces (rule 3 among
        the given-back themselves)."""
        newest: dict[tuple[str, str], CommandRecord] = {}
        older: set[str] = set()
        for command_id, claimed_until in given.items():
            record = await self.get(command_id)
            if record is None or record.command_type is None:
                continue
            if not rules.given_back_delivered(record) or record.claimed_until != claimed_until:
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
