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
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, ConsumerTag

from amqp_queue.batching import Batcher
from amqp_queue.config import RabbitMQConfig
from amqp_queue.errors import BROKER_FAILURES, broker_errors
from amqp_queue.observer import Observer
from amqp_queue.topology import Topology
from state.base import IndexedStore
from state.errors import BrokerError
from state.model import CommandRecord, PendingCommand
from state.validation import is_command_id

logger = logging.getLogger("amqp_queue.delivery")

MARK_RETRY_FIRST = 0.25
"""Seconds a waiting stream lets pass before it tries a failed delivery mark again; the
wait doubles up to :data:`MARK_RETRY_MOST` while the index keeps failing."""
MARK_RETRY_MOST = 30.0


class _Inbox:
    """A device queue's consumer feeding a local buffer, read a window at a time."""

    def __init__(self, channel: AbstractChannel, queue: AbstractQueue, prefetch: int) -> None:
        self.channel = channel
        self.queue = queue
        self._prefetch = prefetch
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: ConsumerTag | None = None

    async def start(self) -> None:
        with broker_errors(f"consuming from {self.queue.name!r}"):
            self._tag = await self.queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    async def window(self, wait: float | None) -> list[AbstractIncomingMessage]:
        """The next messages, at least one unless ``wait`` seconds pass first."""
        try:
            async with asyncio.timeout(wait):
                first = await self._buffer.get()
        except TimeoutError:
            return []
        return [first, *self.take_buffered(self._prefetch - 1)]

    def take_buffered(self, limit: int | None = None) -> list[AbstractIncomingMessage]:
        taken: list[AbstractIncomingMessage] = []
        while not self._buffer.empty() and (limit is None or len(taken) < limit):
            taken.append(self._buffer.get_nowait())
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
) -> _Inbox:
    with broker_errors("setting the prefetch window"):
        await channel.set_qos(prefetch_count=config.prefetch)
    queue = await topology.declare_queue(channel, device_id)
    inbox = _Inbox(channel, queue, config.prefetch)
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


async def drain(
    channel: AbstractChannel,
    topology: Topology,
    state: IndexedStore,
    config: RabbitMQConfig,
    device_id: str,
    observer: Observer,
) -> list[CommandRecord]:
    """Empties a device queue, marks the live commands in it delivered and returns them.

    Each window of messages is claimed in the index in one atomic step before it is acked,
    so concurrent drains (and stale copies of a message) never hand a command out twice.
    """
    inbox = await open_inbox(channel, topology, config, device_id)
    claimed: list[CommandRecord] = []

    async def settle_window(window: list[AbstractIncomingMessage]) -> None:
        if not window:
            return
        records = await state.claim(device_id, _command_ids(window))
        claimed.extend(records)
        _report_delivered(observer, records, state.clock())
        if len(records) < len(window):
            observer.dropped(len(window) - len(records))
        # Every earlier delivery on this channel is settled, so one ack covers the window.
        # Should it fail, the broker redelivers and the claimed ids are dropped as delivered.
        try:
            await window[-1].ack(multiple=True)
        except BROKER_FAILURES as exc:
            logger.warning("could not ack a drained window of %s: %s", device_id, exc)

    expected = inbox.queue.declaration_result.message_count or 0
    received = 0
    try:
        while True:
            timeout = 0 if received >= expected else config.drain_idle
            window = await inbox.window(timeout)
            if window:
                received += len(window)
                await settle_window(window)
                continue
            if await inbox.ready_count() == 0:
                break
            expected = received + 1
        await inbox.stop()
        # Deliveries that crossed the cancel are ours too.
        await settle_window(inbox.take_buffered())
    except BrokerError:
        if not claimed:
            raise
        # What was claimed is delivered as far as the index goes: hand it out rather than
        # lose it. The rest stays queued for the next drain.
        logger.warning(
            "drain of %s interrupted by the broker after %d commands", device_id, len(claimed)
        )
    return claimed


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
        state: IndexedStore,
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
        self._inbox: _Inbox | None = None
        self._ready: deque[tuple[AbstractIncomingMessage, CommandRecord]] = deque()
        self._current: tuple[AbstractIncomingMessage, CommandRecord] | None = None
        self._marks = Batcher(
            self._mark_delivered,
            max_batch=config.prefetch,
            on_detached_failure=self._log_mark_failure,
        )
        self._closed = False
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
            if window:
                await self._admit(window)
            elif self._unmarked:
                retry_in = min(retry_in * 2, MARK_RETRY_MOST)
        self._current = self._ready.popleft()
        return self._current[1].to_pending()

    async def close(self) -> None:
        """Settles finished commands, requeues the rest and releases the channel.

        A broker failure here is logged, not raised: with the channel gone the broker has
        already requeued every unacknowledged message.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._inbox is not None:
                await self._inbox.stop()
            await self._flush_finished()
            unfinished = [message for message, _ in self._ready]
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
        """Keeps the window's live commands, in queue order, and drops the rest."""
        live = await self._state.deliverable(_command_ids(window))
        self._checked_at = self._clock()
        seen: set[str] = set()
        for message in window:
            record = live.get(message.message_id or "")
            if record is None or record.device_id != self._device_id or record.id in seen:
                await self._drop(message)
                continue
            seen.add(record.id)
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
