"""A drain's two-phase claim: the commands it claims, then hands over (``DELIVERED``) just
before it hands them out.

Claimed, a command stays open to every other reader: pending in
``get_status``, counted against its device's limit, refusing outcomes, still cancellable or
replaceable. Only delivery skips it. The hand-over then takes what is still the drain's: a
command cancelled, replaced or expired since the claim is not handed out, and one given back
and claimed again is the later claim's.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from . import rules
from .cancellation import finished, refuse_if_cancelled
from .clock import Clock, advancing
from .errors import ClaimOutcomeUnknown
from .model import CommandRecord

logger = logging.getLogger("amqp_queue.state")


class DrainClaims(abc.ABC):
    """``IndexedStore.claim``, ``hand_over`` and ``drain_pending`` (a mixin of
    :class:`~amqp_queue.state.indexed_store.IndexedStore`)."""

    clock: Clock

    if TYPE_CHECKING:  # provided by IndexedStore

        def _validate_device(self, device_id: str) -> str: ...

        async def release(
            self, requeued: Sequence[CommandRecord], republish: Sequence[CommandRecord]
        ) -> int: ...

    async def drain_pending(self, device_id: str) -> list[bytes]:
        device = self._validate_device(device_id)
        refuse_if_cancelled()
        # Not shielded here: a caller's deadline must be able to cut a drain while the index
        # stalls before its hand-over. Once that began it runs to its end, and its commands
        # are returned through the caller's cancellation (see _drain_index).
        handed = await self._drain_index(device)
        return [record.payload for record in rules.in_ready_order(handed)]

    async def _drain_index(self, device: str) -> list[CommandRecord]:
        """A drain of the index alone: claimed and handed over at once, as nothing is read
        in between. Here in two steps; a backend that can runs both in one transaction.

        A hand-over that landed is returned, its caller cancelled meanwhile or not (the
        call completed, as the delivery layer's drain does): given back instead, its commands
        would open again after other calls took them as delivered (a replacement left the
        old command alone, a retire skipped it) and be handed out after those returned."""
        try:
            claimed = await self.claim(device)
        except ClaimOutcomeUnknown as exc:
            if not exc.records:
                raise
            # Maybe claimed: handed over all the same (what the claim did not take is not
            # this claim's, and the hand-over leaves it alone).
            logger.warning("drain of %s: %s; handing over what it may have claimed", device, exc)
            claimed = exc.records
        except asyncio.CancelledError:
            # Cut while claiming, the claim may have run all the same (on Redis its reply
            # unread): given back before the cut is raised, or another store's drain skips
            # those commands until the lease lapses and hands out later ones first.
            await self._give_back_cut_claim(device)
            raise
        try:
            handed, _ = await finished(self.hand_over(claimed))
        except BaseException:
            # Nobody receives them: open to the next drain now, not when the claim lapses.
            await asyncio.shield(self.release(claimed, ()))
            raise
        return handed

    async def _give_back_cut_claim(self, device: str) -> None:
        """Gives back what a claim of ``device`` its caller cut may have taken. Nothing here:
        a claim that ran to its end or not at all took nothing its caller does not know of."""
        return

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        """Claims a device's deliverable commands for a drain, atomically, and returns them.

        The first phase of two: claimed, a command stays open (and pending) to every reader,
        and only delivery skips it, until the drain hands it over (:meth:`hand_over`), gives
        it back (:meth:`release`) or its claim lapses (:data:`~amqp_queue.state.rules.CLAIM_LEASE`,
        a drain that died). With ``command_ids`` only those are considered (the delivery layer
        passes the ids of the messages it holds). Concurrent claims never return a command
        twice.
        """
        if command_ids is not None and not command_ids:
            return []
        return await self._claim(device_id, self.clock(), command_ids)

    async def hand_over(self, claimed: Sequence[CommandRecord]) -> list[CommandRecord]:
        """Marks claimed commands delivered, atomically per claim, and returns them (as
        claimed, marked delivered), in the order given. A command no longer this claim's
        (see the module) is left as it is and not returned: its drain must not hand it out.
        Several claims are handed over one after another: should a later one fail, the
        earlier ones have landed and the caller gives them back (read as delivered, then
        open again: a known limit of deep drains cut by an index failure)."""
        by_claim: dict[datetime, dict[str, CommandRecord]] = {}
        for record in claimed:
            if record.claimed_until is not None:
                by_claim.setdefault(record.claimed_until, {})[record.id] = record
        # Each claim's hand-over from the time it begins: not one read before the first,
        # which a later one that waited behind it would send late (and hand out what expired).
        clock = advancing(self.clock)
        handed: dict[str, CommandRecord] = {}
        for claimed_until, records in by_claim.items():
            now = clock()
            for command_id in await self._hand_over(list(records), claimed_until, now):
                handed[command_id] = rules.delivered_by_hand_over(records[command_id], now)
        # Once each: a claim looked up late (Redis, a lost reply) and a new one may both
        # name a command, and only one of them still holds it.
        return [handed.pop(record.id) for record in claimed if record.id in handed]

    async def end_claims(self, command_ids: Collection[str]) -> int:
        """Ends the claims on these commands that are open and claimed, however long their
        lease still runs; returns how many. For a reader that met a claimed command's message
        redelivered: the claiming drain's channel closed with the message unacked, so the
        drain is most likely dead. Were it alive after all, its hand-over now leaves the
        command out, and nothing is handed out twice."""
        return await self._end_claims(command_ids, self.clock()) if command_ids else 0

    @abc.abstractmethod
    async def _end_claims(self, command_ids: Collection[str], now: datetime) -> int:
        """Ends the claims on these open, unexpired commands in one atomic step; returns how
        many it ended."""

    @abc.abstractmethod
    async def _hand_over(
        self, command_ids: Sequence[str], claimed_until: datetime, now: datetime
    ) -> list[str]:
        """Marks delivered, in one atomic step, those of ``command_ids`` still open, unexpired
        and claimed until ``claimed_until`` (:func:`~amqp_queue.state.rules.handed_over`);
        returns their ids (on Redis also those this claim's hand-over delivered before: one
        sent again after its reply was lost answers as the first run did)."""

    @abc.abstractmethod
    async def _claim(
        self, device_id: str, now: datetime, command_ids: Collection[str] | None
    ) -> list[CommandRecord]:
        """Atomically claims deliverable records until ``now`` + ``CLAIM_LEASE``; returns
        them."""
