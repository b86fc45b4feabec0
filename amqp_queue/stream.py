"""``consume``: a device's commands as they arrive, one at a time (see :class:`CommandStream`).

The queue is read with a consumer and a prefetch window, never a ``basic.get`` loop; what
is acked and what goes back follows :mod:`amqp_queue.settlement`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from amqp_queue.channel_closing import close_channel
from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.delivery_marks import DeliveryMarks
from amqp_queue.errors import BrokerError, closed_under, open_again_because
from amqp_queue.inbox import Inbox, open_inbox
from amqp_queue.mark_commits import MarkCommits
from amqp_queue.observer import Observer
from amqp_queue.received import OutcomeReporter, ReceivedCommand
from amqp_queue.requeue_order import ReadyOrder
from amqp_queue.settlement import has_copies, settle_each, settles_beside
from amqp_queue.state.cancellation import being_cancelled
from amqp_queue.state.closing import Closing
from amqp_queue.state.errors import StateError
from amqp_queue.state.model import CommandRecord
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.stream")

MARK_RETRY_FIRST = 0.25
"""Seconds a waiting stream lets pass before it tries a failed delivery mark again; the
wait doubles up to :data:`MARK_RETRY_MOST` while the index keeps failing."""
MARK_RETRY_MOST = 30.0

_HANDED_MEMORY = 10_000  # handed-out ids a stream remembers, to drop late copies of them


class CommandStream(Closing):
    """The commands of one device as they arrive: ``async for command in stream``.

    A command is marked delivered and acked only after the loop body for it finished (when
    the next command is asked for, or the ``async with`` block ends normally). Each window
    of messages is checked against the index in one query when it arrives; commands still
    waiting in it are checked again as they are handed out (or together, at most every
    ``RabbitMQConfig.recheck_after`` seconds, when that is set), so a command cancelled or
    superseded while the device worked on another is not handed out.
    If the body raises inside ``async with``, the command is requeued and comes again; the
    id lets a device ignore a repeat. Each command is a
    :class:`~amqp_queue.received.ReceivedCommand`: ``await command.complete(result)`` or
    ``await command.fail(reason)`` reports its outcome (rule 9). Use it as an async context
    manager (or ``contextlib.aclosing``) so the channel is released and an unfinished
    command is requeued promptly.
    """

    def __init__(
        self,
        open_channel: Callable[[], Awaitable[tuple[AbstractChannel, Topology]]],
        state: DeliveryIndex,
        config: RabbitMQConfig,
        device_id: str,
        observer: Observer,
        reporter: OutcomeReporter,
        marks: MarkCommits,
    ) -> None:
        self._open_channel = open_channel
        self._reporter = reporter
        self._observer = observer
        self._channel: AbstractChannel | None = None
        self._state = state
        self._config = config
        self._device_id = device_id
        self._inbox: Inbox | None = None
        self._ready: deque[tuple[AbstractIncomingMessage, CommandRecord]] = deque()
        self._current: tuple[AbstractIncomingMessage, CommandRecord] | None = None
        self._closed = False
        self._close_ended = asyncio.Event()  # a second close() waits for the first
        self._interrupted = False  # interrupt(): a stream still opening ends once open
        self._opening: asyncio.Future[Inbox] | None = None  # close() cancels it (RPC may hang)
        # A window the index failed on: not handed out, not acked; admitted first next time.
        self._unadmitted: list[AbstractIncomingMessage] = []
        # Ids handed out lately: a copy of one (a repeated publish) is not handed out again.
        self._handed: OrderedDict[str, None] = OrderedDict()
        self._clock = time.monotonic
        self._checked_at = 0.0
        self._looked = False  # nothing awaited on the broker since the front's last look
        quorum = config.queue_type is QueueType.QUORUM
        self._order = ReadyOrder(state, device_id) if quorum else None
        # Handed out in ready order there: a multiple ack could take one still in hand.
        self._marks = DeliveryMarks(
            state, observer, config, device_id, ack_together=self._order is None, commits=marks
        )

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def _leave(self, *, finished: bool) -> None:
        if finished:
            self._finish_current()
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def aclose(self) -> None:
        """Ends the stream as leaving ``async with`` does: the command last handed out
        counts as finished, unless an exception is on its way out (its loop body raised).
        From another task while the body may run, use :meth:`close` (which requeues it)."""
        await self._leave(finished=sys.exc_info()[1] is None)

    async def __anext__(self) -> ReceivedCommand:
        if self._closed:
            raise StopAsyncIteration
        await self._open()
        self._finish_current()
        if self._interrupted:  # the store is closing: a loop that asks for more ends
            await self.close()
        if self._closed:  # or it closed while it opened
            raise StopAsyncIteration
        if self._unadmitted:  # before anything newer: these came first
            await self._admit([])
        # Commands left over from a window may have gone stale while the loop body ran.
        self._looked = False
        recheck = self._config.recheck_after
        if self._ready and recheck and self._clock() - self._checked_at > recheck:
            await self._recheck()
        while True:
            await self._drop_expired()
            retry_in = MARK_RETRY_FIRST
            while not self._ready:
                await self._marks.flush()
                # With marks still failing, the wait is bounded: the device may have nothing
                # more coming (or the broker holds back, the prefetch window being full of
                # unacked commands), and their status must not say pending for ever.
                window = await self._next_window(retry_in if self._marks.unmarked else None)
                if window:
                    await self._admit(window)
                elif self._marks.unmarked:
                    retry_in = min(retry_in * 2, MARK_RETRY_MOST)
            if self._order is None or await self._in_ready_order():
                if self._ready[0][1].expires_at <= self._state.clock():
                    continue  # expired since it was looked at (a late answer): dropped above
                if self._looked or recheck:
                    break
                # The front was looked at before the loop body ran or stale messages were
                # dropped: a cancel that returned meanwhile is seen before the hand-out.
                await self._recheck_next()
        if self._interrupted:  # the store began to close while this looked
            await self.close()
        if self._closed:
            raise StopAsyncIteration
        self._current = self._ready.popleft()
        self._handed[self._current[1].id] = None
        if len(self._handed) > _HANDED_MEMORY:
            self._handed.popitem(last=False)
        record = self._current[1]
        return record.to_pending(ReceivedCommand, reporter=self._reporter.bound_to(record.id))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> bool:
        """Open on its queue and not closed yet."""
        return self._inbox is not None and not self._closed

    def interrupt(self) -> None:
        """Ends the stream from outside (its store is closing): a loop waiting for the next
        command ends, and the next ``__anext__`` ends the iteration."""
        self._interrupted = True
        if self._inbox is not None:
            self._inbox.interrupt()

    async def close(self) -> None:
        """Settles finished commands, requeues the rest and releases the channel. A broker
        failure here is logged, not raised: the broker requeues what a lost channel held."""
        if self._closed:  # waits for another task's close: what it settles needs the channel
            await self._close_ended.wait()
            return
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        try:
            if self._inbox is not None and not self._inbox.interrupted:
                await self._inbox.stop_within(self._config.publish_timeout)
            await self._marks.flush_within(self._config.publish_timeout)
            unfinished = [*self._unadmitted, *(message for message, _ in self._ready)]
            self._unadmitted = []
            if self._current is not None:
                unfinished.insert(0, self._current[0])
            if self._inbox is not None:
                unfinished.extend(self._inbox.take_buffered())
            await settle_each(unfinished, ack=False)
        except BrokerError as exc:
            logger.warning("consumer of %s closed after a broker failure: %s", self._device_id, exc)
        finally:
            self._marks.owe_unlanded()  # also when the close is cancelled
            self._ready.clear()
            self._current = None
            if self._inbox is not None:
                # A loop of another task waiting for the broker in __anext__ ends now.
                self._inbox.interrupt()
            try:
                if self._channel is not None:
                    what = f"the consumer channel of {self._device_id}"
                    await close_channel(self._channel, self._config.publish_timeout, what)
            finally:
                self._close_ended.set()

    async def _open(self) -> None:
        if self._inbox is None:
            try:
                await self._open_inbox()
            except BrokerError as exc:
                reason = open_again_because(exc)
                if reason is None or self._closed:
                    raise
                logger.info("stream of %s: %s as it opened; opening again", self._device_id, reason)
                await self._open_inbox()

    async def _open_inbox(self) -> None:
        self._channel, topology = await self._open_channel()
        if self._closed:
            # close() ran while the channel opened, and could not close it.
            channel, self._channel = self._channel, None
            what = "the channel of a stream closed while it opened"
            await close_channel(channel, self._config.publish_timeout, what)
            return
        self._opening = asyncio.ensure_future(
            open_inbox(self._channel, topology, self._config, self._device_id)
        )
        try:
            with closed_under(f"opening the stream of {self._device_id}"):
                self._inbox = await self._opening
        except BaseException:
            # Closed, so a stream that never opened neither leaks nor holds messages unacked.
            channel, self._channel = self._channel, None
            what = "the channel of a stream that did not open"
            await asyncio.shield(close_channel(channel, self._config.publish_timeout, what))
            if self._closed and not being_cancelled():
                return  # close() ended it while it opened: the loop just ends
            raise
        finally:
            self._opening = None
        if self._interrupted:
            self._inbox.interrupt()

    def _finish_current(self) -> None:
        if self._current is not None:
            # Marked and acked in the background at once (what finishes meanwhile shares the
            # write): a command the device is done with must not stay cancellable, or say
            # PENDING, while the device works on the next one.
            self._marks.post(self._current)
            self._current = None

    async def _next_window(self, wait: float | None) -> list[AbstractIncomingMessage]:
        """The next window; the stream ends here if its store is closing meanwhile, or the
        broker cancelled its consumer (the queue was deleted: the device retired)."""
        assert self._inbox is not None
        window = await self._inbox.window(wait)
        if self._inbox.interrupted or self._inbox.cancelled_by_broker:
            # The broker cancels a consumer whose queue is deleted (the device retired): the
            # stream ends, as it does for a closing store; a new stream reads a new queue.
            self._unadmitted.extend(window)
            await self.close()
            raise StopAsyncIteration
        return window

    async def _in_ready_order(self) -> bool:
        """On a quorum queue: whether the next command may go out, no older one missing from
        the stream's hands (see :mod:`amqp_queue.requeue_order`); False: look again."""
        assert self._order is not None
        await self._reorder()  # read by a call cut short
        if not self._ready:
            return False
        present = ({record.id for _, record in self._ready}, self._handed)
        front = self._ready[0]
        missing = self._order.missing_before(front[1], present)
        if not missing:
            if not self._order.waited:
                return True
            # It may have been cancelled or replaced while the stream read on.
            self._order.waited = False
            await self._recheck_next()
            return bool(self._ready) and self._ready[0] is front
        self._order.waited = True
        await self._marks.flush()  # acked, the finished ones free the window
        assert self._inbox is not None
        full = self._config.prefetch
        if len(self._ready) >= full and await self._order.may_rotate(
            missing, self._inbox.ready_count, full
        ):
            # A full window: nothing more comes until these go back, behind the missing ones.
            ready, self._ready = self._ready, deque()
            await settle_each([message for message, _ in ready], ack=False)
        window = await self._order.read_on(missing, self._next_window)
        if window:
            await self._admit(window)
        return False

    async def _admit(self, window: list[AbstractIncomingMessage]) -> None:
        """Keeps the window's live commands, in queue order, and drops the rest.

        Should the index fail, the window stays here, unsettled, and is asked about again
        first on the next ``__anext__`` (or requeued by ``close``): never acked unasked.
        """
        self._unadmitted.extend(window)
        if has_copies(self._unadmitted):
            self._marks.ack_singly()  # copies: one kept in an earlier one's place
        live, finished = await self._marks.split_live(self._unadmitted)
        if self._closed:
            # close() ran while the index answered (a query slower than the close grace):
            # it requeued these messages, which are the next consumer's now.
            return
        self._unadmitted = []
        self._checked_at = self._clock()
        self._looked = True
        # Every message placed before anything is awaited: cut while acking the stale ones,
        # the live ones stay to hand out (or requeue), never left for a multiple ack to take.
        stale = list(finished)
        waiting = {record.id: at for at, (_, record) in enumerate(self._ready)}
        for message, record in live:
            if record.id in self._handed:
                # Dropped, unless its delivery mark has not landed (see DeliveryMarks.adopt).
                if (dropped := self._marks.adopt(message, record.id)) is not None:
                    stale.append(dropped)
            elif (at := waiting.get(record.id)) is not None:
                # A copy of a command waiting here (a repeated publish, or the broker's
                # redelivery to a restored channel): kept once, as its first delivery while
                # that one's channel can settle it (its place in the queue), else the latest.
                self._marks.ack_singly()
                if settles_beside(self._ready[at][0], message):
                    stale.append(message)
                else:
                    stale.append(self._ready[at][0])
                    self._ready[at] = (message, record)
            else:
                self._ready.append((message, record))
        if self._order is not None:
            # Before anything is awaited: a call cut short from here on leaves the order to
            # be read by the next (see _reorder), never a window handed out unordered.
            self._ready = deque(sorted(self._ready, key=lambda item: item[1].ready_at))
            self._order.stale = True
        await self._drop_all(stale)
        await self._reorder()

    async def _reorder(self) -> None:
        """On a quorum queue, after a window came: the index's ready order read again, and
        what ended since the window's check (a cancel that returned) dropped."""
        if self._order is None or not self._order.stale:
            return
        try:
            ended = await self._order.refresh([record.id for _, record in self._ready])
        except StateError as exc:
            logger.warning("consumer of %s keeps queue order: %s", self._device_id, exc)
            self._order.stale = False
            return
        gone = [message for message, record in self._ready if record.id in ended]
        self._ready = deque(item for item in self._ready if item[1].id not in ended)
        await self._drop_all(gone)

    async def _recheck(self) -> None:
        """Asks the index again, in one query, about every command still waiting."""
        live = await self._state.deliverable([record.id for _, record in self._ready])
        self._checked_at = self._clock()
        waiting = self._ready
        self._ready = deque(item for item in waiting if item[1].id in live)
        await self._drop_all([message for message, record in waiting if record.id not in live])

    async def _drop_all(self, messages: list[AbstractIncomingMessage]) -> None:
        """Acks stale messages (every one, also when the caller is cancelled half way)."""
        if messages:
            self._looked = False
            logger.debug("dropping %d stale messages", len(messages))
            self._observer.dropped(len(messages))  # acked in the background if cancelled
            await settle_each(messages, ack=True)

    async def _drop_expired(self) -> None:
        """Drops expired commands from the front."""
        while self._ready and self._ready[0][1].expires_at <= self._state.clock():
            await self._drop_all([self._ready.popleft()[0]])

    async def _recheck_next(self) -> None:
        """Drops stale commands from the front until the next one is live (a read each)."""
        while self._ready:
            message, record = self._ready[0]
            if await self._state.is_deliverable(record.id):
                self._looked = True
                return
            self._ready.popleft()
            await self._drop_all([message])
