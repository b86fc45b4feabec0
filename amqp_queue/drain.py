"""``drain``: empties a device queue now and hands over the live commands in it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol

from aio_pika.abc import AbstractIncomingMessage
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from amqp_queue.config import RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.errors import BrokerError
from amqp_queue.inbox import Inbox
from amqp_queue.mark_commits import MarkCommits
from amqp_queue.observer import Observer
from amqp_queue.settlement import Settlement, command_ids, report_delivered, split_live
from amqp_queue.state.errors import ClaimOutcomeUnknown, CommandNotFound, StateError
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.drain")

CLAIM_MOST = 1000
"""Commands a drain claims in one index statement (a deep queue takes several)."""


class Debts(Protocol):
    """What a drain leaves to the outbox relay (:class:`~amqp_queue.outbox.OutboxRelay`)."""

    def owe(self, command_ids: Iterable[str]) -> None:
        """Publishes these commands again."""

    def owe_release(self, command_ids: Iterable[str]) -> None:
        """Gives these claimed commands back, republished, once the index takes them."""

    async def land_marks(self, command_ids: Collection[str] = ()) -> None:
        """Commits the publish marks, after the publishes of ``command_ids`` under way."""


async def drain(
    inbox: Inbox,
    state: DeliveryIndex,
    config: RabbitMQConfig,
    device_id: str,
    observer: Observer,
    outbox: Debts,
    marks: MarkCommits,
) -> list[CommandRecord]:
    """Empties a device queue, marks the live commands in it delivered and returns them.

    The queue is read to the end first, then its messages are claimed in the index (one
    atomic step for up to :data:`CLAIM_MOST`), so concurrent drains (and stale copies of a
    message) never hand a command out twice, and a process that dies while the drain still
    reads has claimed nothing; the messages are acked when the drain hands over, so the
    channel reads without a prefetch bound (``inbox`` comes from
    ``open_inbox(..., window_only=True)``).
    What the index failed on, and live commands another transaction held, stay queued (see
    :class:`Settlement`). When the index fails after some commands were claimed (a deep
    queue's later claim), the drain returns those (they are delivered as far as the index
    goes) and leaves the rest queued; with nothing claimed it raises. The store closing
    (:meth:`Inbox.interrupt`) while the drain reads ends it: nothing is claimed, what was
    read goes back to the queue, and the drain returns nothing. A
    claim whose outcome the index cannot tell (:class:`ClaimOutcomeUnknown`) counts as
    claimed while its messages stay queued. Cancelled, it gives back what it
    claimed (see :func:`give_back`; ``outbox`` takes on what it cannot give back itself).
    """
    settlement = Settlement(device_id)
    claimed: list[CommandRecord] = []
    # Settled here (claimed, or finished) and acked only once the drain hands over: until
    # then every message keeps its place in the queue, so a cancelled drain leaves the queue
    # in order for the next consumer (a republished command would go behind newer ones).
    settled: list[AbstractIncomingMessage] = []
    # Claimed commands whose acks may have left: their messages are gone from the queue.
    acked: list[CommandRecord] = []

    async def settle_window(window: list[AbstractIncomingMessage]) -> None:
        if not window:
            return
        # Shielded: cancelled after its transaction committed but before its answer came,
        # the claim would take commands nobody gives back; its records are awaited instead.
        # Through ``marks``: a command a closed stream handed out is not claimed again.
        claim = asyncio.ensure_future(marks.claim(device_id, command_ids(window)))
        try:
            records = await asyncio.shield(claim)
        except asyncio.CancelledError:
            settlement.hold(window)
            await _outlasting(claim)
            if not claim.cancelled():
                error = claim.exception()
                if error is None:
                    claimed.extend(claim.result())
                elif isinstance(error, ClaimOutcomeUnknown):
                    claimed.extend(error.records)  # given back, in case the claim landed
            raise
        except ClaimOutcomeUnknown as exc:
            # The claim may have landed: its commands are handed out all the same and their
            # messages stay queued, so the next drain drops them if it landed (delivered)
            # and hands them out again if not: a copy at worst, where "not claimed" would
            # lose every one that the claim did take (the next drain would drop them).
            settlement.hold(window)
            claimed.extend(exc.records)
            raise
        except BaseException:
            settlement.hold(window)
            raise
        claimed.extend(records)
        taken = {record.id for record in records}
        # A copy of a claimed command (its id twice in the window) is finished: not in rest.
        rest = [message for message in window if message.message_id not in taken]
        failure: StateError | None = None
        finished: list[AbstractIncomingMessage] = []
        held: list[AbstractIncomingMessage] = []
        if rest:
            try:
                live, finished = await split_live(state, device_id, rest)
            except StateError as exc:
                held, failure = rest, exc
            else:
                # Live and not taken here: locked by another transaction (a publish mark, a
                # confirm, another drain's claim not committed yet). Requeued at the end.
                held = [message for message, _ in live]
            settlement.hold(held)
        report_delivered(observer, records, state.clock())
        if finished:
            observer.dropped(len(finished))
        held_ids = {id(message) for message in held}
        settled.extend(message for message in window if id(message) not in held_ids)
        if failure is not None:
            raise failure

    async def hand_over(*, in_order: bool) -> None:
        # What goes back goes first: once the acks are sent, nothing is awaited before the
        # drain returns, so no cancellation can fall between them and the caller.
        await settlement.release()
        # Counted as acked before the acks are sent: cancelled half way, a message may be
        # gone or not, and a copy (dropped at delivery) is better than a loss.
        acked.extend(claimed)
        await settlement.ack(settled, in_order=in_order)

    expected = inbox.queue.declaration_result.message_count or 0
    received = 0
    # Read, not claimed yet: the drain claims only once it has read the queue to the end.
    unclaimed: list[AbstractIncomingMessage] = []
    try:
        try:
            while not inbox.interrupted:
                timeout = 0 if received >= expected else config.drain_idle
                window = await inbox.window(timeout, fill=expected - received)
                if window:
                    received += len(window)
                    unclaimed.extend(window)
                    continue
                if inbox.cancelled_by_broker and not inbox.interrupted:  # its queue deleted
                    raise BrokerError(f"draining {device_id}: the broker cancelled its consumer")
                if inbox.interrupted or await inbox.ready_count() == 0:
                    break
                expected = received + 1
            await inbox.stop()
            if inbox.interrupted:
                # Nothing is claimed yet: all of it goes back, rather than claims that a
                # close may not wait for (a deep queue, a slow index).
                logger.info("drain of %s ended by close after %d messages", device_id, received)
                settlement.hold([*unclaimed, *inbox.take_buffered()])
                unclaimed = []
            else:
                # Deliveries that crossed the cancel are ours too.
                unclaimed.extend(inbox.take_buffered())
            # Claimed last, right before the hand-over: a process that dies while the drain
            # still asks the broker (the queue's depth, the consumer's cancel) has claimed
            # nothing, and the broker requeues it all. A death loses commands while a claim
            # runs or after it: its answer on the way, a deeper queue's later claims, the
            # look at what a claim did not take (split_live), the acks.
            while unclaimed:
                chunk, unclaimed = unclaimed[:CLAIM_MOST], unclaimed[CLAIM_MOST:]
                await settle_window(chunk)
        except (BrokerError, StateError) as exc:
            settlement.hold([*unclaimed, *inbox.take_buffered()])
            if not claimed:
                await settlement.release()
                # Stale messages only; one by one, as the consumer may still be receiving.
                await settlement.ack(settled, in_order=False)
                raise
            # What was claimed is delivered as far as the index goes: hand it out rather
            # than lose it. The rest stays queued for the next drain.
            logger.warning(
                "drain of %s interrupted after %d commands: %s", device_id, len(claimed), exc
            )
            await hand_over(in_order=False)
        else:
            # The consumer is cancelled and its buffer taken: every delivery is settled or
            # requeued by now, so one frame may ack them all.
            await hand_over(in_order=True)
    except BaseException:
        # Nobody gets what this drain claimed (cancelled, or a failure it does not hand
        # over): it goes back, never to DELIVERED. The channel closes only after the index
        # has taken it back.
        gone = {record.id for record in acked}
        unacked = [record for record in claimed if record.id not in gone]
        inbox.settling = asyncio.ensure_future(
            give_back(
                state, settlement, inbox, unacked, acked, outbox, stop_within=config.publish_timeout
            )
        )
        await asyncio.shield(inbox.settling)
        raise
    return claimed


async def give_back(
    state: DeliveryIndex,
    settlement: Settlement,
    inbox: Inbox,
    requeued: Sequence[CommandRecord],
    republish: Sequence[CommandRecord],
    outbox: Debts,
    *,
    stop_within: float,
) -> None:
    """Undoes a cancelled drain: its claims are released in the index and its messages
    requeued; commands whose messages it had acked go back to the outbox, to be published
    again. A failure is logged: the caller is being cancelled and cannot hear it.

    The consumer is cancelled first: requeued while it still ran, the broker would hand
    every other message straight back to it; and it tells whether the channel still holds
    the drain's messages. One that is lost or closing (the broker requeues every unacked
    message of a closed channel at once) gave them back while the index still said
    delivered: another consumer may have dropped them as stale, so their commands go to the
    outbox as well (a copy at worst, dropped at delivery). So do they when the broker does
    not answer the cancel within ``stop_within`` seconds.

    Then the index: a message requeued while its command still said delivered would be
    dropped as stale by the next consumer. Then every unsettled delivery goes back in one
    frame (a multiple requeue up to the last one received), so a consumer already waiting
    on the queue gets them in their order, not the held ones ahead of the claimed ones."""
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
            # Their messages go back now and the next reader drops them as delivered: the
            # relay gives the commands back, published again, once the index takes them.
            logger.error(
                "a cancelled drain could not give back %d commands; the outbox relay will: %s",
                len(requeued) + len(republish),
                exc,
            )
            outbox.owe_release([record.id for record in [*requeued, *republish]])
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
            await state.release(
                [record.id for record in requeued], [record.id for record in republish]
            )


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
    commands still said delivered, and another consumer may have dropped them as stale:
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
            await state.release([], [record.id for record in again])
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


async def _outlasting(future: asyncio.Future[Any]) -> None:
    """Waits until ``future`` is done, through further cancellations of the caller (whose
    first one it is handling, and raises once this returns): a second cancel while a drain
    waits for its claim (a timeout and a task group both cancelling) used to leave the
    claim's commands out of what the drain gives back, delivered to nobody."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
