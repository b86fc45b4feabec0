"""The settlement rule of ``consume`` and ``drain``, written once: what is acked, what goes back.

Both read a device queue with a consumer and a prefetch window and ask the state index about
a whole window in one query. A message whose id the index does not hold as live (superseded,
cancelled, expired, delivered, unknown) is acked and dropped: only live commands are ever
handed out. Expiry is checked too, since classic queues drop expired messages only at the
head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import ChannelInvalidStateError

from amqp_queue.channel_closing import closing, give_up_on, in_turn, unless_closed
from amqp_queue.claim_ends import ClaimEnds
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.errors import broker_failure
from amqp_queue.observer import Observer
from amqp_queue.state.errors import StateError
from amqp_queue.state.model import CommandRecord
from amqp_queue.state.validation import is_command_id

logger = logging.getLogger("amqp_queue.settlement")

SETTLE_WITHIN = 10.0
"""Seconds an ack or requeue may wait for its frame to be written. aiormq waits for the
connection's writer (a stalled link), and for room in its buffer of ten frames, which a
connection closed under the call (a close cut short by the caller's deadline) never makes:
such a wait ends as the connection closes (``unless_closed``), this is the bound on the
rest. Whatever is left unsettled the broker requeues with the channel."""


def command_ids(messages: Sequence[AbstractIncomingMessage]) -> list[str]:
    # A foreign message's id that is no command id would fail a UUID column's query for the
    # whole window (PostgreSQL) on every retry; it is dropped as stale instead.
    return [message.message_id for message in messages if is_command_id(message.message_id)]


def has_copies(messages: Sequence[AbstractIncomingMessage]) -> bool:
    """Whether two of the messages carry one command (foreign messages, with no command id
    or none at all, are no copies of each other)."""
    ids = command_ids(messages)
    return len(set(ids)) < len(ids)


async def settle(message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False) -> None:
    """Acks (or requeues) a message, or with ``multiple`` every unsettled delivery up to it;
    a lost channel already requeued them on the broker, and one being closed will (a frame
    on it now would close the whole connection: see :mod:`amqp_queue.channel_closing`).

    Runs to its end even if the caller is cancelled meanwhile (see :func:`settle_each`)."""
    await _to_the_end([in_turn(_channel_of(message), _settle(message, ack=ack, multiple=multiple))])


async def settle_each(messages: Sequence[AbstractIncomingMessage], *, ack: bool) -> None:
    """Acks (or requeues) each of ``messages``, in order, one frame each.

    All of them, even if the caller is cancelled half way (a deadline around a stream's next
    command, as a gateway polls): the caller has taken them off its books, and one left
    unsettled would hold a place in the channel's prefetch window, its command out of the
    device's reach, until the channel closed. Each channel's settles go out in the order
    they began (:func:`~amqp_queue.channel_closing.in_turn`).
    """
    by_channel: dict[object, list[AbstractIncomingMessage]] = {}
    for message in messages:
        by_channel.setdefault(_channel_of(message), []).append(message)
    turns = [
        in_turn(channel, _settle_in_order(mine, ack=ack)) for channel, mine in by_channel.items()
    ]
    if turns:
        await _to_the_end(turns)


def _channel_of(message: AbstractIncomingMessage) -> object:
    try:
        return message.channel
    except ChannelInvalidStateError:  # closed: its settle fails by itself, and says so
        return _CLOSED


class _Closed:
    """The key of messages whose channel is closed (weakly referenced, as channels are)."""


_CLOSED = _Closed()


async def _settle_in_order(messages: list[AbstractIncomingMessage], *, ack: bool) -> None:
    for message in messages:
        await _settle(message, ack=ack)


async def _to_the_end(turns: list[asyncio.Future[None]]) -> None:
    together = asyncio.gather(*turns)
    try:
        await asyncio.shield(together)
    except asyncio.CancelledError:
        if not together.done():
            together.add_done_callback(_log_unexpected)
        raise


def _log_unexpected(together: asyncio.Future[list[None]]) -> None:
    # Broker failures are logged by _settle itself; anything else is a bug, and its caller
    # is gone: said here rather than as "exception never retrieved".
    if not together.cancelled() and (error := together.exception()) is not None:
        logger.error("settling messages after their caller was cancelled failed", exc_info=error)


async def _settle(message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False) -> None:
    if closing(message):
        logger.debug("message %s left to its closing channel", message.message_id)
        return
    try:
        async with asyncio.timeout(SETTLE_WITHIN):
            # Drains settling at once when the store closed answered 8 s after close()
            # returned: their frames waited for room in aiormq's buffer (ten frames) that
            # the stopped writer never made.
            if ack:
                await unless_closed(message.channel, message.ack(multiple=multiple))
            else:
                await unless_closed(message.channel, message.nack(multiple=multiple, requeue=True))
    except BaseException as exc:
        if not broker_failure(exc):
            raise
        if isinstance(exc, TimeoutError):
            give_up_on(message)
        logger.warning(
            "could not %s message %s (%r); the broker requeues it with the lost channel",
            "ack" if ack else "requeue",
            message.message_id,
            exc,
        )


class Settlement:
    """The settlement rule of ``consume`` and ``drain``, written once.

    A message is acked only when this call took its command (claimed it, or marked it
    delivered) or its command is provably finished: the index does not hold it as live
    (delivered, superseded, cancelled, expired, or unknown to it). A message of a live
    command this call did not take (locked by another transaction, an index failure, a
    close) is held unacknowledged and requeued when the call ends, never acked: requeued,
    it keeps its place in the queue for the next consumer.

    Acks: while nothing is held, one ``multiple`` ack covers a window (every earlier
    delivery on the channel is settled); once something is held, each message is acked by
    itself, since a multiple ack would take the held ones with it.
    """

    def __init__(self, device_id: str) -> None:
        self._device_id = device_id
        self._held: list[AbstractIncomingMessage] = []

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def hold(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Keeps messages unacknowledged, to be requeued by :meth:`release`."""
        self._held.extend(messages)

    async def ack(
        self, messages: Sequence[AbstractIncomingMessage], *, in_order: bool = True
    ) -> None:
        """Acks ``messages``; ``in_order``: they are every unsettled delivery of the channel
        up to the last of them, so one frame may ack them all."""
        if not messages:
            return
        if in_order and not self._held:
            await settle(messages[-1], ack=True, multiple=True)
            return
        await settle_each(messages, ack=True)

    async def release(self) -> None:
        """Requeues every held message."""
        held, self._held = self._held, []
        await settle_each(held, ack=False)

    async def requeue_all(self, last: AbstractIncomingMessage | None) -> None:
        """Requeues every unsettled delivery of the channel up to ``last`` (held or not) in
        one frame, so they go back together and keep their order.

        Should ``last`` be settled already (acked by itself after something was held), the
        frame names the newest held delivery instead: aio-pika sends nothing for a settled
        one, and the held would wait for the channel to close.
        """
        held, self._held = self._held, []
        unsettled = [message for message in [*held, last] if message and not message.processed]
        if unsettled:
            newest = max(unsettled, key=lambda message: message.delivery_tag or 0)
            await settle(newest, ack=False, multiple=True)


async def split_live(
    state: DeliveryIndex,
    device_id: str,
    messages: Sequence[AbstractIncomingMessage],
    *,
    latest: bool = False,
    revive: ClaimEnds | None,
) -> tuple[list[tuple[AbstractIncomingMessage, CommandRecord]], list[AbstractIncomingMessage]]:
    """The messages whose commands the index holds as live (one query), and the rest.

    A live command of another device (a foreign publish) counts as not live here, and so
    does a second message of one command (a copy): only the first is kept, or with
    ``latest`` the last delivery in the first one's place when the first can no longer be
    settled (after a lost channel the broker gave it again).

    ``revive``: a redelivered message of a claimed command ends the claim first, through
    these asks (see :func:`end_orphaned_claims`); a drain does that before its own claim,
    and passes None.
    """
    live = await state.deliverable(command_ids(messages))
    # Back from a closed channel unacked, the message of a claimed command was its drain's:
    # that drain most likely died between its claim and its hand-over, and the claim would
    # keep the command from every device until it lapsed; dropped here, it would be lost.
    if revive is not None:
        orphaned = _redelivered_ids(messages, excluding=live)
        if orphaned and await revive.end_claims(orphaned):
            live |= await state.deliverable(orphaned)
    kept: list[tuple[AbstractIncomingMessage, CommandRecord]] = []
    finished: list[AbstractIncomingMessage] = []
    place: dict[str, int] = {}
    for message in messages:
        record = live.get(message.message_id or "")
        if record is None or record.device_id != device_id:
            finished.append(message)
        elif record.id not in place:
            place[record.id] = len(kept)
            kept.append((message, record))
        elif latest and not settles_beside(kept[place[record.id]][0], message):
            finished.append(kept[place[record.id]][0])
            kept[place[record.id]] = (message, record)
        else:
            finished.append(message)
    return kept, finished


def settles_beside(first: AbstractIncomingMessage, later: AbstractIncomingMessage) -> bool:
    """Whether the first delivery of a command can still be settled where a later copy came
    (the same open channel): then it is kept, at its place in the queue. A copy kept instead
    would go back (a loop body raising, a close) to the copy's own place, behind newer
    commands (tests/test_copy_keeps_order.py)."""
    try:
        return first.channel is later.channel and not first.channel.is_closed
    except ChannelInvalidStateError:  # closed: the broker gave the command again
        return False


async def end_orphaned_claims(
    state: DeliveryIndex, messages: Sequence[AbstractIncomingMessage], own: Collection[str]
) -> None:
    """Ends the claims on the commands of the redelivered ``messages`` (but ``own``, the
    caller's claims): back from a closed channel unacked, such a message was the claiming
    drain's, and that drain most likely died between its claim and its hand-over. Its claim
    would keep the command from every device until it lapsed, and the message would be
    dropped meanwhile as not deliverable: lost. A claiming drain alive after all finds the
    command no longer its own at its hand-over and leaves it out."""
    orphaned = _redelivered_ids(messages, excluding=own)
    if not orphaned:
        return
    try:
        await state.end_claims(orphaned)
    except StateError as exc:
        # Best effort: the claims lapse by themselves, and the claim that follows meets the
        # index's state on its own.
        logger.warning(
            "ending the claims of %d redelivered commands failed: %s", len(orphaned), exc
        )


def _redelivered_ids(
    messages: Sequence[AbstractIncomingMessage], *, excluding: Collection[str]
) -> list[str]:
    """The command ids of the redelivered ``messages`` (a closed channel's, maybe a dead
    drain's), but ``excluding``."""
    redelivered = command_ids([message for message in messages if message.redelivered])
    return [command_id for command_id in redelivered if command_id not in excluding]


def report_delivered(observer: Observer, records: Sequence[CommandRecord], now: datetime) -> None:
    if records:
        observer.delivered(
            records, [max(0.0, (now - record.ready_at).total_seconds()) for record in records]
        )
