"""A device queue read by a consumer into a local buffer, a window at a time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    ConsumerTag,
)
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed
from pamqp.commands import Basic, Queue
from pamqp.common import FieldTable

from amqp_queue.channel_closing import underlying_channel, usable
from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.errors import BrokerError, QueueMismatch, broker_errors
from amqp_queue.topology import Topology

T = TypeVar("T")

logger = logging.getLogger("amqp_queue.inbox")


class Inbox:
    """A device queue's consumer feeding a local buffer, read a window at a time."""

    def __init__(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        window: int,
        *,
        arguments: FieldTable | None = None,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self._window = window
        self._arguments = arguments
        # A drain's clean-up after a cancel; the channel closes only once it is done.
        self.settling: asyncio.Future[None] | None = None
        self.last: AbstractIncomingMessage | None = None
        """The latest delivery received (the highest delivery tag of the channel)."""
        # None is the wake-up of interrupt(): a reader waiting for the broker returns.
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._tag: ConsumerTag | None = None
        self._consumer: ConsumerTag | None = None
        self._stopping: asyncio.Future[object] | None = None
        self.interrupted = False
        self.cancelled_by_broker = False
        """The broker cancelled the consumer: its queue was deleted (a device retired), with
        every message the consumer held unsettled."""
        self.queue_gone = False
        """A look at the queue found it deleted; the broker closed the channel then."""

    async def start(self) -> None:
        with broker_errors(f"consuming from {self.queue.name!r}"):
            await usable(self.channel)
            underlay = await self.channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            if isinstance(self.channel, AbstractRobustChannel):
                # A reconnect reopens the channel on a new underlying one: heard there too.
                self.channel.reopen_callbacks.add(self._hear_cancels_again)
            try:
                self._tag = self._consumer = await self.queue.consume(
                    self._on_message, no_ack=False, arguments=self._arguments
                )
            except ChannelPreconditionFailed as exc:
                if CANCEL_ON_FAIL_OVER not in " ".join(map(str, exc.args)):
                    raise
                # A "classic" queue that is quorum (a vhost whose default queue type is
                # quorum makes every declaration without one quorum): the same every time.
                raise QueueMismatch(
                    f"queue {self.queue.name!r} is a quorum queue, not the classic queue "
                    "RabbitMQConfig asks for (a vhost default queue type?); set queue_type "
                    "to quorum"
                ) from exc

    async def _hear_cancels_again(self, channel: AbstractRobustChannel | None, /) -> None:
        # Read without waiting: get_underlay_channel waits for the connection, for ever
        # should it close for good right after this reopen.
        reopened = underlying_channel(channel) if channel is not None else None
        if isinstance(reopened, aiormq.abc.AbstractChannel):
            reopened.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        if frame.consumer_tag == self._consumer:
            self.cancelled_by_broker = True
            # aio-pika restores a robust consumer the broker cancelled: a probe channel
            # declares its queue again (a retired device's, left behind) and consumes anew,
            # and a probe cut by this stream's close sent a second Channel.Close, which
            # closed the whole connection (tests/test_retired_queue_stays_gone.py). Taken
            # out of its restoring before that runs.
            consumers = getattr(self.queue, "_consumers", None)
            if isinstance(consumers, dict):
                consumers.pop(frame.consumer_tag, None)
            # Nothing more comes: a reader waiting for the broker returns (see window()).
            self._buffer.put_nowait(None)
            self._arrived.set()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.last = message
        self._buffer.put_nowait(message)
        self._arrived.set()

    def interrupt(self) -> None:
        """Ends every wait for the broker at once (the store is closing)."""
        self.interrupted = True
        self._buffer.put_nowait(None)
        self._arrived.set()

    async def window(self, wait: float | None, *, fill: int = 1) -> list[AbstractIncomingMessage]:
        """The next messages, at least one unless ``wait`` seconds pass first, the inbox is
        interrupted or the broker cancelled the consumer.

        ``fill``: how many messages the caller expects (a drain knows the queue's depth);
        after the first, the window waits up to ``wait`` seconds more for up to that many (at
        most a window). Under load a queue's messages trickle in, and every window is one
        claim in the index: a window of what happened to be buffered cost a device several
        transactions where one does.
        """
        if self.interrupted:
            return []
        wanted = min(fill, self._window)
        # Waits with the messages in the buffer, so a cancelled wait holds none of them.
        # (qsize counts interrupt()'s wake-up too: it ends the wait like a message.)
        try:
            async with asyncio.timeout(wait):
                await self._buffered(1)
        except TimeoutError:
            return []
        if self._buffer.qsize() < wanted and not self.interrupted:
            try:
                async with asyncio.timeout(wait):
                    await self._buffered(wanted)
            except TimeoutError:
                pass
        return self.take_buffered(self._window)

    async def _buffered(self, count: int) -> None:
        """Returns once the buffer holds ``count`` items (or the inbox is interrupted, or the
        broker cancelled the consumer)."""
        while self._buffer.qsize() < count and not (self.interrupted or self.cancelled_by_broker):
            self._arrived.clear()
            await self._arrived.wait()

    def take_buffered(self, limit: int | None = None) -> list[AbstractIncomingMessage]:
        taken: list[AbstractIncomingMessage] = []
        while not self._buffer.empty() and (limit is None or len(taken) < limit):
            message = self._buffer.get_nowait()
            if message is not None:
                taken.append(message)
        return taken

    async def ready_count(self) -> int:
        """Messages ready in the queue (unacknowledged ones held by consumers not counted).

        Raises:
            BrokerError: the broker failed, or the queue is gone (deleted: a device retired;
                a passive declare, which does not bring it back).
        """
        with broker_errors(f"inspecting {self.queue.name!r}"):
            declared = await self._declared_passively()
        return declared.message_count or 0

    async def ready_unless_deleted(self) -> int | None:
        """Messages ready in the queue, or None if it was deleted (a device retired) with
        the deliveries this consumer holds unsettled: the broker cancelled the consumer, or
        the queue is gone (the broker then closes the channel, which settles nothing more).

        Raises:
            BrokerError: the broker failed otherwise (the channel is then lost).
        """
        if self.cancelled_by_broker or self.queue_gone:
            return None
        with broker_errors(f"inspecting {self.queue.name!r}"):
            try:
                declared = await self._declared_passively()
            except ChannelNotFoundEntity:
                self.queue_gone = True
                return None
        return declared.message_count or 0

    async def queue_deleted(self) -> bool:
        """Whether the queue was deleted (see :meth:`ready_unless_deleted`)."""
        return await self.ready_unless_deleted() is None

    async def _declared_passively(self) -> Queue.DeclareOk:
        # On aiormq's channel: aio-pika's robust channel answers a passive declare from its
        # cache, with a stale count. A missing queue closes the channel (404).
        underlay = await self.channel.get_underlay_channel()
        return await _uncancelled(underlay.queue_declare(self.queue.name, passive=True))

    async def stop_within(self, seconds: float) -> None:
        """:meth:`stop`, given up on after ``seconds`` (logged): on a connection
        waiting for the broker it would wait for ever, and closing the channel cancels the
        consumer anyway."""
        try:
            async with asyncio.timeout(seconds):
                await self.stop()
        except (BrokerError, TimeoutError) as exc:
            logger.warning("cancelling the consumer on %r: %s", self.queue.name, exc)

    async def stop(self) -> None:
        """Cancels the consumer; deliveries already received stay in the buffer. Called
        again, it waits for the first call's cancel (which a cancelled caller left running)."""
        robust = isinstance(self.channel, AbstractRobustChannel)
        if self._tag is not None and (self.queue_gone or (self.cancelled_by_broker and not robust)):
            # The broker ended the consumer: closed the channel (404), or cancelled it. (On a
            # robust channel it is cancelled here all the same, a cancel the broker answers
            # for a tag it no longer knows: the robust queue's own bookkeeping goes with it.)
            self._tag = None
        if self._tag is not None:
            tag, self._tag = self._tag, None
            self._stopping = _started(self.queue.cancel(tag))
        if self._stopping is not None:
            with broker_errors(f"cancelling consumer on {self.queue.name!r}"):
                await _uncancelled(self._stopping)


def _started(call: Awaitable[T]) -> asyncio.Future[T]:
    future = asyncio.ensure_future(call)
    # Its failure is heard by whoever awaits it; with nobody left, it is not "never retrieved".
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


async def _uncancelled(call: Awaitable[T]) -> T:
    """Awaits a broker RPC that a cancellation of the caller does not cut short.

    aiormq closes a channel whose RPC is cancelled (or times out) half way, and the broker
    then requeues every unacknowledged delivery of it at once: a drain's claimed messages
    would go back while the index still says their commands are delivered, and the next
    consumer would drop them as stale before the drain could give its claims back. The
    caller is cancelled at once all the same; the RPC finishes by itself.
    """
    return await asyncio.shield(_started(call))


CANCEL_ON_FAIL_OVER = "x-cancel-on-ha-failover"
"""A classic queue's consumer argument: when its queue dies, RabbitMQ 3.x's channel consumes
again by the queue's name (mirrored-queue fail-over) and cancels only if that fails; a queue of
that name declared meanwhile (a retire, then a publisher declaring it again) got the consumer,
which the channel had already forgotten, and its deliveries were held unsent until the channel
closed, after newer ones reached other consumers (10 to 19% of such races). With it the broker
cancels the consumer (RabbitMQ 4 always does). Quorum queues refuse it."""


def consumer_arguments(config: RabbitMQConfig) -> FieldTable | None:
    """The arguments of a consumer on a device queue of ``config``'s type."""
    return {CANCEL_ON_FAIL_OVER: True} if config.queue_type is QueueType.CLASSIC else None


async def open_inbox(
    channel: AbstractChannel,
    topology: Topology,
    config: RabbitMQConfig,
    device_id: str,
    *,
    window_only: bool = False,
) -> Inbox:
    """A consumer on the device queue, read ``config.prefetch`` messages at a time.

    ``window_only``: the broker sends without a prefetch bound (for a drain, which acks
    only when it hands over and would otherwise stall on a full window); the window still
    bounds each index query.

    The broker calls are not cut short by a cancellation of the caller (see
    :func:`_uncancelled`): aiormq closes a channel whose RPC is cancelled half way, and an
    owner closing it again then stopped the channel's reader before the broker's Close-Ok
    came. Deliveries of the consumer just started kept arriving for it, filled its ten-frame
    buffer, and the connection's reader, waiting for room there, stopped reading for every
    channel of the connection: opens, acks and deliveries of all the store's other streams
    and drains stalled until the heartbeat gave up on the connection.
    """
    return await _uncancelled(_opened(channel, topology, config, device_id, window_only))


async def _opened(
    channel: AbstractChannel,
    topology: Topology,
    config: RabbitMQConfig,
    device_id: str,
    window_only: bool,
) -> Inbox:
    # Each step first looks whether the channel was closed for good meanwhile (a cut
    # stream closes its channel): a robust channel's calls would wait for ever.
    with broker_errors("setting the prefetch window"):
        await usable(channel)
        await channel.set_qos(prefetch_count=0 if window_only else config.prefetch)
    queue = await topology.declare_queue(channel, device_id)
    inbox = Inbox(channel, queue, config.prefetch, arguments=consumer_arguments(config))
    await inbox.start()
    return inbox
