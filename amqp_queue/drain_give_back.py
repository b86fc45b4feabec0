"""Undoing a drain cut short (cancelled, or failed after its claim): its claims go back to
the index, its messages to the queue, and what it cannot give back itself to the outbox."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.errors import BrokerError
from amqp_queue.inbox import Inbox
from amqp_queue.settlement import Settlement
from amqp_queue.state.errors import ClaimOutcomeUnknown, CommandNotFound, StateError
from amqp_queue.state.model import CommandRecord

# The drain's own: a give-back is the end of a drain.
logger = logging.getLogger("amqp_queue.drain")


class Debts(Protocol):
    """What a drain leaves to the outbox relay (:class:`~amqp_queue.outbox.OutboxRelay`)."""

    def owe(self, command_ids: Iterable[str]) -> None:
        """Publishes these commands again."""

    def owe_release(self, claimed: Iterable[CommandRecord]) -> None:
        """Gives these claimed commands back, republished, once the index takes them."""

    async def land_marks(self, command_ids: Collection[str] = ()) -> None:
        """Commits the publish marks, after the publishes of ``command_ids`` under way."""


async def give_back(
    state: DeliveryIndex,
    settlement: Settlement,
    inbox: Inbox,
    requeued: Sequence[CommandRecord],
    republish: Sequence[CommandRecord],
    outbox: Debts,
    *,
    stop_within: float,
    claimed_only: Collection[str] = (),
) -> None:
    """Undoes a cancelled drain: its claims are released in the index and its messages
    requeued; commands whose messages it had acked go back to the outbox, to be published
    again. A failure is logged: the caller is being cancelled and cannot hear it.

    The consumer is cancelled first: requeued while it still ran, the broker would hand
    every other message straight back to it; and it tells whether the channel still holds
    the drain's messages. One that is lost or closing (the broker requeues every unacked
    message of a closed channel at once) gave them back while the index still said claimed
    or delivered: another consumer may have dropped the handed-over ones as delivered (the
    claimed ones it takes over: see ``settlement.end_orphaned_claims``), so their commands
    go to the outbox as well (a copy at worst, dropped at delivery); the release leaves
    alone whatever another consumer took over meanwhile. So do they when the broker does
    not answer the cancel within ``stop_within`` seconds.

    Then the index: a message requeued while its command still said delivered would be
    dropped as stale by the next consumer, and one still claimed would cost a write to end
    the claim. Then every unsettled delivery goes back in one
    frame (a multiple requeue up to the last one received), so a consumer already waiting
    on the queue gets them in their order, not the held ones ahead of the claimed ones.
    ``claimed_only``: the ids whose hand-over surely did not land (only claimed)."""
    try:
        # Bounded: close() gives a give-back this long before it closes the channel anyway.
        async with asyncio.timeout(stop_within):
            await inbox.stop()
    except (BrokerError, TimeoutError) as exc:
        logger.warning("a cancelled drain could not cancel its consumer: %r", exc)
        if requeued:
            logger.warning(
                "its messages went back with the channel: %d commands are published again",
                len(requeued),
            )
            requeued, republish = [], [*republish, *requeued]
    if requeued or republish:
        try:
            ids = [record.id for record in [*requeued, *republish]]
            await outbox.land_marks(ids)  # landing later, a mark would undo the unpublish
            await _release_retrying(state, requeued, republish, within=stop_within)
        except Exception as exc:
            # Their messages go back now. A handed-over command's the next reader drops as
            # delivered: the relay gives it back, published again, once the index takes it.
            # A command only claimed (its hand-over surely never landed) is not owed: the
            # next reader of its requeued message ends the claim (see settlement.split_live)
            # and hands it out, which a later release would undo into a second delivery.
            owed = [record for record in [*requeued, *republish] if record.id not in claimed_only]
            logger.error(
                "a cancelled drain could not give back %d commands; the outbox relay will "
                "give back %d, the claims of the rest end with their next reader: %s",
                len(requeued) + len(republish),
                len(owed),
                exc,
            )
            outbox.owe_release(owed)
        else:
            given_back = len(requeued) + len(republish)
            # Requeued into nothing, the reopened commands would wait for messages that are
            # gone: with a lost channel they are published again; with their queue deleted
            # (the device retired meanwhile) they end as retiring ends open commands.
            fate = await _requeue_fate(inbox) if requeued else None
            if fate == "lost":
                republish = [*republish, *await _taken_back(state, requeued)]
            elif fate == "deleted":
                await _cancel_retired(state, requeued)
            outbox.owe([record.id for record in republish])
            logger.info("a cancelled drain gave back %d commands", given_back)
    inbox.take_buffered()
    await settlement.requeue_all(inbox.last)


async def _release_retrying(
    state: DeliveryIndex,
    requeued: Sequence[CommandRecord],
    republish: Sequence[CommandRecord],
    *,
    within: float,
) -> None:
    """Releases the give-back's commands, trying again for ``within`` seconds while the
    index fails. The drain's messages wait for it unacked while its channel lasts; should
    the store close it first, the broker requeues them and the give-back finds the channel
    lost (see :func:`_requeue_fate`)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(StateError),
        stop=stop_after_delay(within),
        wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
        reraise=True,
    ):
        with attempt:
            await state.release(requeued, republish)


async def _requeue_fate(inbox: Inbox) -> str | None:
    """What became of the queue a give-back requeues into: None (still there), "lost" (the
    channel is gone, the broker requeued the messages already; or it cannot be told, and a
    copy is better than a loss) or "deleted" (with its messages)."""
    if inbox.channel.is_closed:
        return "lost"
    try:
        return "deleted" if await inbox.queue_deleted() else None
    except BrokerError as exc:
        logger.info("a cancelled drain cannot tell what became of its queue: %s", exc)
        return "lost"


async def _cancel_retired(state: DeliveryIndex, reopened: Sequence[CommandRecord]) -> None:
    """Ends the reopened commands of a give-back whose queue was deleted meanwhile (the
    device retired: it cancels the open commands, and these were delivered then)."""
    cancelled = 0
    for record in reopened:
        try:
            await state.cancel(record.id)
        except CommandNotFound:  # CommandExpired too
            continue  # ended already: by the retiring itself, or otherwise
        except Exception as exc:
            logger.error(
                "a cancelled drain could not cancel %s of a retired device: %s", record.id, exc
            )
            continue
        cancelled += 1
    logger.warning(
        "a cancelled drain found its queue deleted (the device retired): %d commands cancelled",
        cancelled,
    )


async def _taken_back(
    state: DeliveryIndex, reopened: Sequence[CommandRecord]
) -> list[CommandRecord]:
    """The reopened commands of a give-back whose channel was lost meanwhile, made
    unpublished again; the ones another consumer took are left to it.

    Lost before the index took them back, the channel requeued their messages while their
    commands were still claimed or delivered, and another consumer may have dropped them:
    reopened as they were, they would wait for a message that is gone. Taken again and given
    back unpublished, the outbox publishes them once more (if a message did survive, the
    copy is dropped at delivery)."""
    device_id = reopened[0].device_id
    try:
        try:
            again = await state.claim(device_id, [record.id for record in reopened])
        except ClaimOutcomeUnknown as exc:
            # Taken or not: given back unpublished all the same (a release leaves alone
            # what is not delivered), rather than left delivered to nobody.
            again = exc.records
        if again:
            await state.release([], again)
    except Exception as exc:
        logger.error(
            "a cancelled drain lost its channel while giving back %d commands, and could not "
            "have them published again: %s",
            len(reopened),
            exc,
        )
        return []
    logger.warning(
        "a cancelled drain lost its channel while giving back: %d commands are published again",
        len(again),
    )
    return again
