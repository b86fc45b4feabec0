"""Delivery from a device queue: ``consume`` (a stream) and ``drain`` (empty it now).

Both read the queue with a consumer and a prefetch window, never a ``basic.get`` loop, and
ask the state index about a whole window in one query. A message whose id the index does not
hold as live (superseded, cancelled, expired, delivered, unknown) is acked and dropped:
only live commands are ever handed out. Expiry is checked here too, since classic queues
drop expired messages only at the head.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, ConsumerTag

from amqp_queue.batching import Batcher
from amqp_queue.config import RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.errors import BROKER_FAILURES, BrokerError, broker_errors
from amqp_queue.observer import Observer
from amqp_queue.state.errors import StateError
from amqp_queue.state.model import CommandRecord, PendingCommand
from amqp_queue.state.validation import is_command_id
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.delivery")

MARK_RETRY_FIRST = 0.25
"""Seconds a waiting stream lets pass before it tries a failed delivery mark again; the
wait doubles up to :data:`MARK_RETRY_MOST` while the index keeps failing."""
MARK_RETRY_MOST = 30.0

# How many handed-out ids a stream remembers to drop late copies of them.
_HANDED_MEMORY = 10_000


class Inbox:
    """A device queue's consumer feeding a local buffer, read a window at a time."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, prefetch: int) -> None:
        self.channel = channel
        self.queue = queue
        self._prefetch = prefetch
        # None is the wake-up of interrupt(): a reader waiting for the broker returns.
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._tag: ConsumerTag | None = None
        self.interrupted = False

    async def start(self) -> None:
        with broker_errors(f"consuming from {self.queue.name!r}"):
            self._tag = await self.queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    def interrupt(self) -> None:
        """Ends every wait for the broker at once (the store is closing)."""
        self.interrupted = True
        self._buffer.put_nowait(None)

    async def window(self, wait: float | None) -> list[AbstractIncomingMessage]:
        """The next messages, at least one unless ``wait`` seconds pass first or the inbox
        is interrupted."""
        if self.interrupted:
            return []
        try:
            async with asyncio.timeout(wait):
                first = await self._buffer.get()
        except TimeoutError:
            return []
        if first is None:
            return []
        return [first, *self.take_buffered(self._prefetch - 1)]

    def take_buffered(self, limit: int | None = None) -> list[AbstractIncomingMessage]:
        taken: list[AbstractIncomingMessage] = []
        while not self._buffer.empty() and (limit is None or len(taken) < limit):
            message = self._buffer.get_nowait()
            if message is not None:
                taken.append(message)
        return taken

    async def ready_count(self) -> int:
        """Messages ready in the queue (unacknowledged ones held by consumers not counted)."""
        # Declared again with the same arguments (a robust channel answers a passive declare
        # from its cache, with a stale count).
        with broker_errors(f"inspecting {self.queue.name!r}"):
            declared = await self.queue.declare()
        return declared.message_count or 0

    async def stop(self) -> None:
        """Cancels the consumer; deliveries already received stay in the buffer."""
        if self._tag is not None:
            tag, self._tag = self._tag, None
            with broker_errors(f"cancelling consumer on {self.queue.name!r}"):
                await self.queue.cancel(tag)


async def open_inbox(
    channel: AbstractChannel, topology: Topology, config: RabbitMQConfig, device_id: str
) -> Inbox:
    with broker_errors("setting the prefetch window"):
        await channel.set_qos(prefetch_count=config.prefetch)
    queue = await topology.declare_queue(channel, device_id)
    inbox = Inbox(channel, queue, config.prefetch)
    await inbox.start()
    return inbox


def _command_ids(messages: Sequence[AbstractIncomingMessage]) -> list[str]:
    # A foreign message's id that is no command id would fail a UUID column's query for the
    # whole window (PostgreSQL) on every retry; it is dropped as stale instead.
    return [message.message_id for message in messages if is_command_id(message.message_id)]


async def _settle(message: AbstractIncomingMessage, *, ack: bool, multiple: bool = False) -> None:
    """Acks (or requeues) a message, or with ``multiple`` every delivery up to it; a lost
    channel already requeued them on the broker."""
    try:
        if ack:
            await message.ack(multiple=multiple)
        else:
            await message.nack(requeue=True)
    except BROKER_FAILURES as exc:
        logger.warning(
            "could not %s message %s (%s); the broker requeues it with the lost channel",
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
            await _settle(messages[-1], ack=True, multiple=True)
            return
        for message in messages:
            await _settle(message, ack=True)

    async def release(self) -> None:
        """Requeues every held message."""
        held, self._held = self._held, []
        for message in held:
            await _settle(message, ack=False)


async def split_live(
    state: DeliveryIndex,
    device_id: str,
    messages: Sequence[AbstractIncomingMessage],
) -> tuple[list[tuple[AbstractIncomingMessage, CommandRecord]], list[AbstractIncomingMessage]]:
    """The messages whose commands the index holds as live (one query), and the rest.

    A live command of another device (a foreign publish) counts as not live here, and so
    does a second message of one command (a copy): only the first is kept.
    """
    live = await state.deliverable(_command_ids(messages))
    kept: list[tuple[AbstractIncomingMessage, CommandRecord]] = []
    finished: list[AbstractIncomingMessage] = []
    seen: set[str] = set()
    for message in messages:
        record = live.get(message.message_id or "")
        if record is None or record.device_id != device_id or record.id in seen:
            finished.append(message)
            continue
        seen.add(record.id)
        kept.append((message, record))
    return kept, finished


async def drain(
    inbox: Inbox,
    state: DeliveryIndex,
    config: RabbitMQConfig,
    device_id: str,
    observer: Observer,
    owe: Callable[[Sequence[str]], None],
) -> list[CommandRecord]:
    """Empties a device queue, marks the live commands in it delivered and returns them.

    Each window of messages is claimed in the index in one atomic step before it is acked,
    so concurrent drains (and stale copies of a message) never hand a command out twice.
    What the index failed on, and live commands another transaction held, stay queued (see
    :class:`Settlement`). When the index or the broker fails after some commands were
    claimed, or the store closes (:meth:`Inbox.interrupt`), the drain returns those (they
    are delivered as far as the index goes) and leaves the rest queued; with nothing claimed
    it raises. Cancelled, it gives back what it claimed (see :func:`give_back`; ``owe``
    hands the commands whose messages were already acked to the outbox relay).
    """
    settlement = Settlement(device_id)
    claimed: list[CommandRecord] = []
    # Claimed in windows already acked: their messages have left the queue.
    acked: list[CommandRecord] = []
    # Claimed in the window being settled, not acked yet.
    unacked: list[CommandRecord] = []

    async def settle_window(window: list[AbstractIncomingMessage]) -> None:
        if not window:
            return
        try:
            records = await state.claim(device_id, _command_ids(window))
        except BaseException:
            settlement.hold(window)
            raise
        unacked.extend(records)
        claimed.extend(records)
        taken = {record.id for record in records}
        rest = [message for message in window if message.message_id not in taken]
        failure: StateError | None = None
        finished: list[AbstractIncomingMessage] = []
        if rest:
            try:
                live, finished = await split_live(state, device_id, rest)
            except StateError as exc:
                settlement.hold(rest)
                failure = exc
            else:
                # Live and not taken here: locked by another transaction (a publish mark, a
                # confirm, another drain's claim not committed yet). Requeued at the end.
                settlement.hold([message for message, _ in live])
        _report_delivered(observer, records, state.clock())
        if finished:
            observer.dropped(len(finished))
        # Copies of a claimed command (its id twice in the window) are finished too.
        held = {id(message) for message in rest} if failure else set()
        if not failure:
            live_ids = {id(message) for message in finished}
            held = {id(message) for message in rest if id(message) not in live_ids}
        settled = [message for message in window if id(message) not in held]
        # Counted as acked before the ack is sent: cancelled half way, a message may be
        # gone or not, and a copy (dropped at delivery) is better than a loss.
        acked.extend(records)
        unacked.clear()
        await settlement.ack(settled, in_order=len(settled) == len(window))
        if failure is not None:
            raise failure

    expected = inbox.queue.declaration_result.message_count or 0
    received = 0
    try:
        try:
            while not inbox.interrupted:
                timeout = 0 if received >= expected else config.drain_idle
                window = await inbox.window(timeout)
                if window:
                    received += len(window)
                    await settle_window(window)
                    continue
                if inbox.interrupted or await inbox.ready_count() == 0:
                    break
                expected = received + 1
            await inbox.stop()
            if inbox.interrupted:
                logger.info("drain of %s ended by close after %d commands", device_id, len(claimed))
                settlement.hold(inbox.take_buffered())
            else:
                # Deliveries that crossed the cancel are ours too.
                await settle_window(inbox.take_buffered())
        except (BrokerError, StateError) as exc:
            settlement.hold(inbox.take_buffered())
            if not claimed:
                raise
            # What was claimed is delivered as far as the index goes: hand it out rather
            # than lose it. The rest stays queued for the next drain.
            logger.warning(
                "drain of %s interrupted after %d commands: %s", device_id, len(claimed), exc
            )
        finally:
            await settlement.release()
    except asyncio.CancelledError:
        # Nobody gets what this drain claimed: it goes back, never to DELIVERED.
        await asyncio.shield(give_back(state, settlement, inbox, unacked, acked, owe))
        raise
    return claimed


async def give_back(
    state: DeliveryIndex,
    settlement: Settlement,
    inbox: Inbox,
    requeued: Sequence[CommandRecord],
    republish: Sequence[CommandRecord],
    owe: Callable[[Sequence[str]], None],
) -> None:
    """Undoes a cancelled drain: its claims are released in the index and its messages
    requeued; commands whose messages it had acked go back to the outbox, to be published
    again. A failure is logged: the caller is being cancelled and cannot hear it.

    The index first: a message requeued while its command still said delivered would be
    dropped as stale by the next consumer. The unacked messages of ``requeued`` go back
    with the channel, which the caller closes after this."""
    if requeued or republish:
        try:
            await state.release(
                [record.id for record in requeued], [record.id for record in republish]
            )
        except Exception as exc:
            logger.error(
                "a cancelled drain could not give back %d commands, which stay delivered: %s",
                len(requeued) + len(republish),
                exc,
            )
        else:
            owe([record.id for record in republish])
            logger.info("a cancelled drain gave back %d commands", len(requeued) + len(republish))
    settlement.hold(inbox.take_buffered())
    await settlement.release()


class CommandStream:
    """The commands of one device as they arrive: ``async for command in stream``.

    A command is marked delivered and acked only after the loop body for it finished (when
    the next command is asked for, or the ``async with`` block ends normally). Each window
    of messages is checked against the index in one query when it arrives; commands still
    waiting in it are checked again as they are handed out (or together, at most every
    ``RabbitMQConfig.recheck_after`` seconds, when that is set), so a command cancelled or
    superseded while the device worked on another is not handed out.
    If the body raises inside ``async with``, the command is requeued and comes again; the
    id lets a device ignore a repeat. Use it as an async context manager so the channel is
    released and an unfinished command is requeued promptly.
    """

    def __init__(
        self,
        open_channel: Callable[[], Awaitable[tuple[AbstractChannel, Topology]]],
        state: DeliveryIndex,
        config: RabbitMQConfig,
        device_id: str,
        observer: Observer,
    ) -> None:
        self._open_channel = open_channel
        self._observer = observer
        self._channel: AbstractChannel | None = None
        self._state = state
        self._config = config
        self._device_id = device_id
        self._inbox: Inbox | None = None
        self._ready: deque[tuple[AbstractIncomingMessage, CommandRecord]] = deque()
        self._current: tuple[AbstractIncomingMessage, CommandRecord] | None = None
        self._marks = Batcher(
            self._mark_delivered,
            max_batch=config.prefetch,
            on_detached_failure=self._log_mark_failure,
        )
        self._closed = False
        # A window the index failed on: not handed out, not acked; admitted first next time.
        self._unadmitted: list[AbstractIncomingMessage] = []
        # Ids handed out lately: a copy of one (a publish repeated after a lost confirm) may
        # arrive before its delivery mark is committed, and must not be handed out again.
        self._handed: OrderedDict[str, None] = OrderedDict()
        self._clock = time.monotonic
        self._checked_at = 0.0
        self._ack_together = True
        # Finished commands whose delivery mark failed: unacked, tried again with the next.
        self._unmarked: list[tuple[AbstractIncomingMessage, CommandRecord]] = []

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._finish_current()
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> PendingCommand:
        if self._closed:
            raise StopAsyncIteration
        await self._open()
        self._finish_current()
        if self._unadmitted:
            # Before anything newer: these came first.
            await self._admit([])
        # Commands left over from a window may have gone stale while the loop body ran.
        if self._ready and not self._config.recheck_after:
            await self._recheck_next()
        elif self._ready and self._clock() - self._checked_at > self._config.recheck_after:
            await self._recheck()
        while self._ready and self._ready[0][1].expires_at <= self._state.clock():
            await self._drop(self._ready.popleft()[0])
        retry_in = MARK_RETRY_FIRST
        while not self._ready:
            await self._flush_finished()
            assert self._inbox is not None
            # With marks still failing, the wait is bounded: the device may have nothing
            # more coming (or the broker holds back, the prefetch window being full of
            # unacked commands), and their status must not say pending for ever.
            window = await self._inbox.window(retry_in if self._unmarked else None)
            if self._inbox.interrupted:
                self._unadmitted.extend(window)
                await self.close()
                raise StopAsyncIteration
            if window:
                await self._admit(window)
            elif self._unmarked:
                retry_in = min(retry_in * 2, MARK_RETRY_MOST)
        self._current = self._ready.popleft()
        self._handed[self._current[1].id] = None
        if len(self._handed) > _HANDED_MEMORY:
            self._handed.popitem(last=False)
        return self._current[1].to_pending()

    @property
    def closed(self) -> bool:
        return self._closed

    def interrupt(self) -> None:
        """Ends the stream from outside (its store is closing): a loop waiting for the next
        command ends, and the next ``__anext__`` ends the iteration."""
        if self._inbox is not None:
            self._inbox.interrupt()
        else:
            self._closed = True

    async def close(self) -> None:
        """Settles finished commands, requeues the rest and releases the channel.

        A broker failure here is logged, not raised: with the channel gone the broker has
        already requeued every unacknowledged message.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._inbox is not None and not self._inbox.interrupted:
                try:
                    # Bounded: on a connection waiting for the broker it would wait for ever;
                    # closing the channel cancels the consumer anyway.
                    async with asyncio.timeout(self._config.publish_timeout):
                        await self._inbox.stop()
                except (BrokerError, TimeoutError) as exc:
                    logger.warning("cancelling the consumer of %s: %s", self._device_id, exc)
            await self._flush_finished()
            unfinished = [*self._unadmitted, *(message for message, _ in self._ready)]
            self._unadmitted = []
            if self._current is not None:
                unfinished.insert(0, self._current[0])
            if self._inbox is not None:
                unfinished.extend(self._inbox.take_buffered())
            for message in unfinished:
                await _settle(message, ack=False)
        except BrokerError as exc:
            logger.warning("consumer of %s closed after a broker failure: %s", self._device_id, exc)
        finally:
            self._ready.clear()
            self._current = None
            try:
                if self._channel is not None:
                    async with asyncio.timeout(self._config.publish_timeout):
                        await self._channel.close()
            except BROKER_FAILURES as exc:
                logger.warning("closing the consumer channel of %s: %s", self._device_id, exc)

    async def _open(self) -> None:
        if self._inbox is None:
            self._channel, topology = await self._open_channel()
            self._inbox = await open_inbox(self._channel, topology, self._config, self._device_id)

    def _finish_current(self) -> None:
        if self._current is not None:
            # Marked and acked in the background at once (what finishes meanwhile shares the
            # write): a command the device is done with must not stay cancellable, or say
            # PENDING, while the device works on the next one.
            self._marks.post_detached(self._current)
            self._current = None

    async def _admit(self, window: list[AbstractIncomingMessage]) -> None:
        """Keeps the window's live commands, in queue order, and drops the rest.

        Should the index fail, the window stays here, unsettled, and is asked about again
        first on the next ``__anext__`` (or requeued by ``close``): never acked unasked.
        """
        self._unadmitted.extend(window)
        live, finished = await split_live(self._state, self._device_id, self._unadmitted)
        self._unadmitted = []
        self._checked_at = self._clock()
        for message in finished:
            await self._drop(message)
        for message, record in live:
            if record.id in self._handed:
                await self._drop(message)
            else:
                self._ready.append((message, record))

    async def _recheck(self) -> None:
        """Asks the index again, in one query, about every command still waiting."""
        live = await self._state.deliverable([record.id for _, record in self._ready])
        self._checked_at = self._clock()
        waiting, self._ready = self._ready, deque()
        for message, record in waiting:
            if record.id in live:
                self._ready.append((message, record))
            else:
                await self._drop(message)

    async def _recheck_next(self) -> None:
        """Drops stale commands from the front until the next one is live (a read each)."""
        while self._ready:
            message, record = self._ready[0]
            if await self._state.is_deliverable(record.id):
                return
            self._ready.popleft()
            await self._drop(message)

    async def _drop(self, message: AbstractIncomingMessage) -> None:
        logger.debug("dropping stale message %s", message.message_id)
        await _settle(message, ack=True)
        self._observer.dropped(1)

    async def _flush_finished(self) -> None:
        await self._marks.drain()
        if self._unmarked:
            # Before the stream waits for the broker or closes, with nothing new to carry
            # them: the commands whose mark failed get one more try by themselves.
            try:
                await self._mark_delivered([])
            except Exception as exc:  # as the Batcher: kept for the next try, and logged
                self._log_mark_failure(exc)

    def _log_mark_failure(self, exc: BaseException) -> None:
        logger.warning(
            "marking commands of %s delivered failed (%d waiting to be marked): %s",
            self._device_id,
            len(self._unmarked),
            exc,
        )

    async def _mark_delivered(
        self, finished: list[tuple[AbstractIncomingMessage, CommandRecord]]
    ) -> None:
        batch = [*self._unmarked, *finished]
        if not batch:
            return
        self._unmarked = []
        try:
            await self._state.mark_delivered([record.id for _, record in batch])
        except BaseException:
            # The device has them: their status must come to say so, so they are marked
            # again with the next batch. Unacked until then, they come again from the
            # broker should the channel go first (at-least-once). From now on each is acked
            # alone: a batch may then hold deliveries of a channel restored since, and one
            # ack of several deliveries names only the channel of the last.
            self._unmarked = batch
            self._ack_together = False
            raise
        _report_delivered(self._observer, [record for _, record in batch], self._state.clock())
        if self._ack_together:
            # Handed out in delivery order, and every earlier delivery on this channel is
            # settled (acked here or as stale, or in an earlier batch): one frame acks all.
            await _settle(batch[-1][0], ack=True, multiple=True)
            return
        for message, _ in batch:
            await _settle(message, ack=True)


def _report_delivered(observer: Observer, records: Sequence[CommandRecord], now: datetime) -> None:
    if records:
        observer.delivered(
            records, [max(0.0, (now - record.ready_at).total_seconds()) for record in records]
        )
