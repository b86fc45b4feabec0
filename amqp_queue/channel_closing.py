"""Closing a channel without taking its connection with it.

RabbitMQ closes the whole connection (``504 CHANNEL_ERROR - expected 'channel.open'``), every
stream, drain and the publisher of a store with it, when a frame arrives on a channel after the
client sent its ``Channel.Close``: a second ``Close`` (aiormq sends one when the first one's call
is cancelled) or an ack or nack sent meanwhile (a delivery mark landing late, a stream closed from
another task). So a close is never cancelled (:func:`close_channel`), and nothing is settled on a
channel once its close has begun (:func:`closing`): the broker requeues those messages with the
channel (tests/test_channel_close.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustChannel
from aiormq.exceptions import ChannelInvalidStateError

from amqp_queue.config import RabbitMQConfig
from amqp_queue.errors import broker_failure, closed_under_the_call

logger = logging.getLogger("amqp_queue.channel_closing")

T = TypeVar("T")

CLOSED_LOOK = 0.1
"""Seconds between looks at whether a closed channel was closed for good."""

# The underlying (aiormq) channels a close was begun on.
_CLOSING: weakref.WeakSet[object] = weakref.WeakSet()
# Closes the broker had not answered when their callers stopped waiting.
_LATE: set[asyncio.Future[None]] = set()
# Per underlying channel, the last batch of acks or requeues begun on it (see
# amqp_queue.settlement): each runs once the one before it ended, so one channel's frames go
# out in the order their calls began, and the channel's close waits for them.
_SETTLING: weakref.WeakKeyDictionary[object, asyncio.Future[None]] = weakref.WeakKeyDictionary()


def in_turn(channel: object, settling: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Runs ``settling`` as a task of its own, once the settles begun on ``channel`` (the
    aiormq channel of the messages) before it ended.

    A settle the caller stopped waiting for (cancelled) goes on in the background; in turn, a
    multiple ack begun after it cannot go first and leave it naming a delivery the broker
    no longer knows (406 ``unknown delivery tag``: the channel closed)."""
    previous = _SETTLING.get(channel)
    turn = asyncio.ensure_future(_after(previous, settling))
    _SETTLING[channel] = turn
    return turn


async def _after(
    previous: asyncio.Future[None] | None, settling: Coroutine[Any, Any, None]
) -> None:
    if previous is not None and not previous.done():
        await asyncio.wait([previous])
    await settling


def closing(message: AbstractIncomingMessage) -> bool:
    """Whether the close of the channel ``message`` came on, or of its connection, has begun
    (and not ended: a settle on a closed channel fails by itself, and says so)."""
    try:
        channel = message.channel
    except ChannelInvalidStateError:  # closed
        return False
    # Its connection closed, nothing writes a frame on it any more: the broker requeues.
    return channel in _CLOSING or channel.connection.is_closed


def give_up_on(message: AbstractIncomingMessage) -> None:
    """Settles nothing more on the channel ``message`` came on: a settle there went
    unanswered, and a later one could name its delivery again (a 406 closes the channel)."""
    with contextlib.suppress(ChannelInvalidStateError):
        _CLOSING.add(message.channel)


async def close_channel(channel: AbstractChannel, give_up_after: float, what: str) -> None:
    """Closes ``channel``, waiting ``give_up_after`` seconds at most; a failure is logged
    (closed by the broker or with the connection, it needs nothing more). Not answered in time,
    the close goes on in the background: it is never cancelled."""
    ending = asyncio.ensure_future(_close_after_settles(channel, give_up_after))
    try:
        async with asyncio.timeout(give_up_after):
            await asyncio.shield(ending)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if ending.done() and (isinstance(exc, TimeoutError) or closed_under_the_call(exc)):
            # The close itself ended so, not this caller: its connection closed under it.
            logger.warning("closing %s: its connection closed under it", what)
            return
        _LATE.add(ending)
        ending.add_done_callback(functools.partial(_closed_late, what))
        if isinstance(exc, asyncio.CancelledError):
            raise
        logger.warning("closing %s: no answer in %s s; it goes on", what, give_up_after)
    except BaseException as exc:
        if not broker_failure(exc):
            raise
        logger.warning("closing %s: %r", what, exc)


async def _close_after_settles(channel: AbstractChannel, wait: float) -> None:
    underlay = underlying_channel(channel)
    if underlay is not None:
        if (settling := _SETTLING.get(underlay)) is not None:
            # A settle that began before the close goes out first: a frame after its
            # Channel.Close would close the whole connection.
            await asyncio.wait([settling], timeout=wait)
        _CLOSING.add(underlay)
    await channel.close()


def underlying_channel(channel: AbstractChannel) -> object | None:
    """The aiormq channel under an aio-pika one, without waiting (a robust channel's
    ``get_underlay_channel`` waits for its connection to be back)."""
    return getattr(getattr(channel, "_channel", None), "channel", None)


def _closed_late(what: str, ending: asyncio.Future[None]) -> None:
    _LATE.discard(ending)
    failure = None if ending.cancelled() else ending.exception()
    if failure is not None:
        logger.warning("closing %s: %s", what, failure)


async def close_drain_channel(
    channel: AbstractChannel,
    device: str,
    config: RabbitMQConfig,
    settling: asyncio.Future[None] | None,
) -> None:
    """Closes a drain's channel once a cancelled drain's give-back (``settling``) is done."""
    if settling is not None:
        # A cancelled drain's give-back: its unacked messages must not be requeued (by the
        # close) while the index still says delivered, or the next consumer drops them.
        # Bounded, so a hung index call cannot hold close() for ever.
        await asyncio.wait([settling], timeout=config.publish_timeout)
    await close_channel(channel, config.publish_timeout, f"the drain channel of {device}")


def closed_for_good(channel: AbstractChannel) -> bool:
    """Whether ``close()`` was called on the channel or on its connection: a robust channel
    then never reopens, and its calls (which wait for it to be restored) wait for ever."""
    # aio-pika says so only in attributes of its own; its public is_closed stays False
    # while the close waits for the broker's answer.
    connection = getattr(channel, "_connection", None)
    return bool(getattr(channel, "_close_called", False)) or bool(
        getattr(connection, "close_called", False)
    )


async def usable(channel: AbstractChannel) -> None:
    """Returns once a robust ``channel`` is open (restored, should the broker have closed
    it); raises once it is closed for good (see :func:`closed_for_good`). Called right
    before a call on the channel: aio-pika's robust calls first wait for the channel to be
    restored, for ever on one closed for good, and nothing is awaited between this return
    and that wait. The call itself is never cut short here: aiormq closes a channel whose
    RPC is cancelled half way, and a close of its own on top then went unanswered for
    ``publish_timeout``, twice (a probe of stores closed as their streams opened).

    Raises:
        ChannelInvalidStateError: the channel was closed for good.
    """
    if not isinstance(channel, AbstractRobustChannel):
        return
    while True:
        if closed_for_good(channel):
            raise ChannelInvalidStateError(f"{channel} is closed")
        if _restored(channel):
            return
        # Looked at in turns: aio-pika has no callback for a close that has begun.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSED_LOOK):
                await channel.ready()
        # Right after a refusal ready() may answer before the channel noticed it is closed.
        await asyncio.sleep(0)


def _restored(channel: AbstractRobustChannel) -> bool:
    """Whether a robust channel is open and restored: aio-pika opens it again before it has
    replayed its prefetch and declarations, and its calls wait for that replay (for ever,
    should the channel be closed meanwhile), on a connection that is up."""
    # aio-pika keeps both in attributes of its own (see closed_for_good).
    restored = getattr(channel, "_RobustChannel__restored", None)
    connected = getattr(getattr(channel, "_connection", None), "connected", None)
    return (
        not channel.is_closed
        and (restored is None or restored.is_set())
        and (connected is None or connected.is_set())
    )


async def unless_closed(channel: aiormq.abc.AbstractChannel, work: Awaitable[T]) -> T:
    """Awaits ``work`` (a frame sent on ``channel``, an aiormq channel) until the channel's
    connection closes.

    aiormq waits for room in its connection's buffer of frames (ten), which its writer makes:
    once the connection closed nobody does, and a publish or settle waiting then, or waiting
    for the channel's write lock behind one, waited until its caller's own bound.

    Raises:
        aiormq.exceptions.ConnectionClosed: the connection closed first (a broker failure).
    """
    # A new observer of the close on each read, hooked to the connection until it ends: left
    # running, each settle of a long-lived connection kept about 1 KB.
    closed = channel.connection.closing
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait([task, closed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            task.add_done_callback(_retrieved)
        if not closed.done():
            closed.cancel()  # the observer only, not the connection
    if not task.done():
        raise aiormq.exceptions.ConnectionClosed(320, "the connection closed under the call")
    return task.result()


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
