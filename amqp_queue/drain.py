"""``drain``: empties a device queue now and hands over the live commands in it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from amqp_queue.channel_closing import close_drain_channel
from amqp_queue.channel_pool import ChannelPool
from amqp_queue.config import RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.drain_give_back import Debts, give_back
from amqp_queue.errors import BrokerError, open_again_because
from amqp_queue.inbox import Inbox, open_inbox
from amqp_queue.mark_commits import MarkCommits
from amqp_queue.observer import Observer
from amqp_queue.settlement import (
    Settlement,
    command_ids,
    end_orphaned_claims,
    report_delivered,
    split_live,
)
from amqp_queue.state.cancellation import outlasting
from amqp_queue.state.errors import ClaimOutcomeUnknown, StateError
from amqp_queue.state.model import CommandRecord
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.drain")

CLAIM_MOST = 1000
"""Commands a drain claims in one index statement (a deep queue takes several)."""


async def open_drain(
    channels: ChannelPool,
    topology: Topology,
    config: RabbitMQConfig,
    device_id: str,
    background: Callable[[Coroutine[Any, Any, None]], None],
    closing: Callable[[], bool],
) -> tuple[AbstractChannel, Inbox]:
    """A drain's channel and its consumer on the device queue, opened again once if the
    queue or the connection went away under them (see :func:`open_again_because`), unless
    the store is ``closing`` (its own close takes the connection away).
    ``background`` closes a channel whose consumer did not open, nobody waiting for it."""
    for again in (False, True):
        channel = await channels.channel(f"opening a channel to drain {device_id}", robust=False)
        try:
            return channel, await open_inbox(channel, topology, config, device_id, window_only=True)
        except BaseException as exc:
            background(close_drain_channel(channel, device_id, config, None))
            reason = open_again_because(exc) if isinstance(exc, BrokerError) else None
            if again or reason is None or closing():
                raise
            logger.info("drain of %s: %s as it opened; opening again", device_id, reason)
    raise AssertionError("unreachable: the second failure is raised")


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
    reads has claimed nothing. Claimed, the commands still read as open to everyone else;
    the hand-over (a second index write, right before the acks) marks them delivered, and
    the messages are acked then, so the channel reads without a prefetch bound (``inbox``
    comes from ``open_inbox(..., window_only=True)``).
    What the index failed on, and live commands another transaction held, stay queued (see
    :class:`Settlement`). When the index fails after some commands were claimed (a deep
    queue's later claim), the drain hands those over and returns them, and leaves the rest
    queued; with nothing claimed, or the hand-over refused, it raises. The store closing
    (:meth:`Inbox.interrupt`) while the drain reads ends it: nothing is claimed, what was
    read goes back to the queue, and the drain returns nothing. A
    claim whose outcome the index cannot tell (:class:`ClaimOutcomeUnknown`) counts as
    claimed while its messages stay queued. Cancelled before its hand-over landed, it gives
    back what it claimed (see :func:`give_back`; ``outbox`` takes on what it cannot give back
    itself); cancelled once it landed, it finishes and returns what it handed over, as the
    call had completed (every other store reads those commands as delivered already).
    """
    settlement = Settlement(device_id)
    claimed: list[CommandRecord] = []
    # Settled here (claimed, or finished) and acked only once the drain hands over: until
    # then every message keeps its place in the queue, so a cancelled drain leaves the queue
    # in order for the next consumer (a republished command would go behind newer ones).
    settled: list[AbstractIncomingMessage] = []
    # Claimed commands whose acks may have left: their messages are gone from the queue.
    acked: list[CommandRecord] = []
    # Claimed commands whose hand-over failed or was cut: it may have landed.
    maybe_handed: set[str] = set()

    async def settle_window(window: list[AbstractIncomingMessage]) -> None:
        if not window:
            return
        # Shielded: cancelled after its transaction committed but before its answer came,
        # the claim would take commands nobody gives back; its records are awaited instead.
        # Through ``marks``: a command a closed stream handed out is not claimed again.
        own = {record.id for record in claimed}

        async def claim_window() -> list[CommandRecord]:
            # A dead drain's claims first, so that this claim takes its commands in their
            # place, not requeued behind what this drain hands out now.
            await end_orphaned_claims(state, window, own)
            return await marks.claim(device_id, command_ids(window))

        claim = asyncio.ensure_future(claim_window())
        try:
            records = await asyncio.shield(claim)
        except asyncio.CancelledError:
            settlement.hold(window)
            await outlasting(claim)
            if not claim.cancelled():
                error = claim.exception()
                if error is None:
                    claimed.extend(claim.result())
                elif isinstance(error, ClaimOutcomeUnknown):
                    claimed.extend(error.records)  # given back, in case the claim landed
            raise
        except ClaimOutcomeUnknown as exc:
            # The claim may have landed: the hand-over takes what it did claim (and leaves
            # the rest alone), and the messages stay queued, so the next drain drops the
            # handed-over ones and hands out the rest, where "not claimed" would lose every
            # one that the claim did take (held by it, the next reader would drop them).
            settlement.hold(window)
            claimed.extend(exc.records)
            raise
        except BaseException:
            settlement.hold(window)
            raise
        claimed.extend(records)
        # This drain's claims so far: a copy of one in a later window is not live to it.
        taken = {record.id for record in claimed}
        # A copy of a claimed command (its id twice in the window) is finished: not in rest.
        rest = [message for message in window if message.message_id not in taken]
        failure: StateError | None = None
        finished: list[AbstractIncomingMessage] = []
        held: list[AbstractIncomingMessage] = []
        if rest:
            try:
                live, finished = await split_live(state, device_id, rest, revive=None)
            except StateError as exc:
                held, failure = rest, exc
            else:
                # Live and not taken here: locked by another transaction (a publish mark, a
                # confirm, another drain's claim not committed yet). Requeued at the end.
                held = [message for message, _ in live]
            settlement.hold(held)
        if finished:
            observer.dropped(len(finished))
        held_ids = {id(message) for message in held}
        settled.extend(message for message in window if id(message) not in held_ids)
        if failure is not None:
            raise failure

    async def hand_over(*, in_order: bool) -> None:
        # The claim's second phase, and the point of no return: once it lands every other
        # store reads the commands as delivered, and may report outcomes for them or enqueue
        # past them, so they are never given back. Shielded, it is awaited to its end; a
        # cancellation that comes once it landed is too late, and the drain finishes and
        # returns what it handed over (giving it back showed DELIVERED, then PENDING).
        handing = asyncio.ensure_future(state.hand_over(claimed))
        cut = False
        try:
            handed = await asyncio.shield(handing)
        except asyncio.CancelledError:
            await outlasting(handing)
            if handing.cancelled() or handing.exception() is not None or not handing.result():
                if not handing.cancelled() and handing.exception() is not None:
                    maybe_handed.update(record.id for record in claimed)
                raise  # nothing handed over: the cancellation stands
            handed, cut = handing.result(), True
        except BaseException:
            maybe_handed.update(record.id for record in claimed)  # it may have landed
            raise
        kept = {record.id for record in handed}
        lapsed = [record.id for record in claimed if record.id not in kept]
        claimed[:] = handed
        finishing = asyncio.ensure_future(finish(handed, lapsed, in_order=in_order))
        try:
            await asyncio.shield(finishing)
        except asyncio.CancelledError:
            cut = cut or bool(handed)
            await outlasting(finishing)
            if not cut:
                raise
        except Exception:
            pass  # logged below, as a failure after a cut is
        if not finishing.cancelled() and finishing.exception() is not None:
            # Past the point of no return: the acks' messages come back with the channel
            # and are dropped as delivered; the commands are the caller's all the same.
            logger.error(
                "drain of %s: settling after its hand-over failed",
                device_id,
                exc_info=finishing.exception(),
            )
        if cut:
            # Returned all the same (wait_for and asyncio.timeout hand it to their caller). The
            # cancellation stays requested, not taken back: the task's next drain raises it
            # (see refuse_if_cancelled), so a loop of drains ends. A caller that
            # cancelled and drops the result (a cancelled gather, a TaskGroup aborting) loses
            # these: logged with their ids.
            logger.warning(
                "drain of %s cancelled after its hand-over: returns its %d commands %s",
                device_id,
                len(handed),
                [record.id for record in handed],
            )

    async def finish(handed: list[CommandRecord], lapsed: list[str], *, in_order: bool) -> None:
        if lapsed:
            # No longer the claim's: not handed out. Cancelled, replaced, expired or taken
            # over by another reader (which holds a copy of its own), the message is acked;
            # open and free again (given back meanwhile), it goes back to the queue.
            try:
                free: Collection[str] = await state.deliverable(lapsed)
            except StateError:
                free = lapsed  # not known: back to the queue, for the next reader to judge
            settlement.hold([message for message in settled if message.message_id in free])
            settled[:] = [message for message in settled if message.message_id not in free]
        report_delivered(observer, handed, state.clock())
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
                # A deleted queue (a device retired) ends the read as an empty one does:
                # what was read is settled below, as the retire's cancel finds it.
                if inbox.interrupted or not await inbox.ready_unless_deleted():
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
            # nothing, and the broker requeues it all. A death between a claim and the
            # hand-over leaves claims that the next reader of the requeued messages ends
            # (see end_orphaned_claims); a death after the hand-over loses its commands (the
            # acks, the caller using the result).
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
            # What was claimed is handed over (if the index takes the hand-over, else it is
            # given back): handed out rather than left to the claim's lease. The rest stays
            # queued for the next drain.
            logger.warning(
                "drain of %s interrupted after %d commands: %s", device_id, len(claimed), exc
            )
            await hand_over(in_order=False)
            if not claimed:
                raise  # the hand-over left every claimed command out: nothing to return
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
        claimed_only = {
            record.id
            for record in unacked
            if not record.delivered and record.id not in maybe_handed
        }
        inbox.settling = asyncio.ensure_future(
            give_back(
                state,
                settlement,
                inbox,
                unacked,
                acked,
                outbox,
                stop_within=config.publish_timeout,
                claimed_only=claimed_only,
            )
        )
        await asyncio.shield(inbox.settling)
        raise
    return claimed
