"""The broker's errors, and the translation of aio-pika's and aiormq's into them at the boundary.

They derive from :class:`~amqp_queue.state.errors.QueueError`, the root of the one tree."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager

import aio_pika.exceptions
import aiormq.exceptions

from amqp_queue.state.errors import QueueError


class BrokerError(QueueError):
    """RabbitMQ failed or refused an operation."""


class CommandRejected(BrokerError):
    """The broker refused this command for good (it is over the broker's message size).

    Publishing it again fails the same way: the command ends ``REJECTED``.
    """

    def __init__(self, command_id: str, reason: str = "over its maximum message size") -> None:
        super().__init__(f"command {command_id!r} refused by the broker: {reason}")
        self.command_id = command_id
        self.reason = reason


class QueueMismatch(QueueError):
    """A device's queue exists with other settings (queue type, durability) than the store's.

    Not a :class:`BrokerError`: no retry fixes it. Nothing reaches the device until the queue
    is deleted or ``RabbitMQConfig`` matches it. A fault of the store's configuration, not of
    the command: a command already written stays unpublished for a process whose
    configuration matches the queue (see :mod:`amqp_queue.foreign_queues`), never rejected.
    """


BROKER_FAILURES: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPException,
    aiormq.exceptions.AMQPError,
    # A RuntimeError, not an AMQPError: raised while a robust channel is being restored.
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)
"""What a call to the broker raises when the broker, the network or the channel fails."""


def closed_under_the_call(exc: BaseException) -> bool:
    """Whether ``exc`` is aiormq ending a call because its channel or connection closed.

    aiormq rejects what waits on a closing channel or connection with ``CancelledError`` (its
    default) or with a bare ``Exception`` (closed without a reason). Neither is the caller's
    own cancellation (its task is not cancelling), so it is a broker failure like any other:
    passed on as it is, a caller that was not cancelled would see itself cancelled.
    """
    if type(exc) is Exception and not exc.args:  # aiormq's, not one with a message
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and not task.cancelling()
    return False


def queue_vanished(exc: BaseException) -> bool:
    """Whether opening a consumer failed because its queue was deleted under it, between
    its declaration and its binding or consumer (a ``retire_device`` meanwhile, by any
    process): declared again, the queue is new and empty, and a stream or drain opens on
    it."""
    cause = exc.__cause__ if isinstance(exc, BrokerError) else exc
    return isinstance(cause, aiormq.exceptions.ChannelNotFoundEntity) and "no queue" in str(cause)


_NOT_A_LOSS = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.IncompatibleProtocolError,
)


def open_again_because(exc: BrokerError) -> str | None:
    """Why a stream or drain whose consumer failed to open opens it again at once, or None.

    Its queue was deleted under it (:func:`queue_vanished`); or its connection died under it:
    the link, or the broker closing the whole connection, as RabbitMQ 3.10 does with
    ``INTERNAL_ERROR`` when a consume reaches a new quorum queue before its Raft member runs
    (rabbitmq-server#13625). A stream already open survives its connection dying (the store
    reconnects and its consumer comes back); one opening at that moment should too. A second
    failure is raised: the broker is really away, or refuses.
    """
    if queue_vanished(exc):
        return "its queue was deleted"
    cause = exc.__cause__
    lost = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError)
    if isinstance(cause, lost) and not isinstance(cause, _NOT_A_LOSS):
        return f"its connection was lost ({type(cause).__name__})"
    return None


def broker_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker, the network or the channel failing a call (one of
    :data:`BROKER_FAILURES`, or :func:`closed_under_the_call`), not the caller's own error."""
    return isinstance(exc, BROKER_FAILURES) or closed_under_the_call(exc)


def broker_error(doing: str, exc: BaseException) -> BrokerError:
    """The :class:`BrokerError` for a broker failure ``exc`` while ``doing`` something."""
    if (type(exc) is Exception and not exc.args) or isinstance(exc, asyncio.CancelledError):
        return BrokerError(f"{doing} failed: its channel closed under it")
    if isinstance(exc, TimeoutError) and not str(exc):  # asyncio's timeouts say nothing
        return BrokerError(f"{doing} failed: the broker did not answer in time")
    return BrokerError(f"{doing} failed: {type(exc).__name__}: {exc}")


# RabbitMQ's reason when it closes a channel over a message larger than max_message_size.
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def size_refused(exc: BaseException) -> int | None:
    """The broker's maximum message size, when ``exc`` is its refusal of a larger message.

    The broker closes the whole channel, so every publish in flight on it fails with the
    same exception: only one whose body is over this size was the one refused.
    """
    if not isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return None
    match = _TOO_LARGE.search(" ".join(map(str, exc.args)))
    return None if match is None else int(match[2])


@contextmanager
def queue_declaration(name: str) -> Iterator[None]:
    """Broker failures declaring queue ``name`` as :class:`BrokerError`, except a refusal.

    A declaration refused with 406 PRECONDITION_FAILED (the queue exists with another
    ``x-queue-type`` or durability) fails the same way every time: :class:`QueueMismatch`.
    The refusal closes the channel under every declaration in flight on it, with the same
    exception; the broker's reason names the queue, so only that queue's is a mismatch.
    """
    doing = f"declaring queue {name!r}"
    try:
        with closed_under(doing):
            yield
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        reason = " ".join(map(str, exc.args))
        if f"queue '{name}'" not in reason:
            raise broker_error(doing, exc) from exc
        raise QueueMismatch(
            f"queue {name!r} exists with other settings than RabbitMQConfig asks for "
            f"({reason}); delete the queue or set queue_type and durable to match it"
        ) from exc
    except BROKER_FAILURES as exc:
        raise broker_error(doing, exc) from exc


@contextmanager
def broker_errors(doing: str) -> Iterator[None]:
    """Re-raises broker failures as :class:`BrokerError` naming what was being done."""
    try:
        with closed_under(doing):
            yield
    except BROKER_FAILURES as exc:
        raise broker_error(doing, exc) from exc


@contextmanager
def closed_under(doing: str) -> Iterator[None]:
    """Re-raises a channel or connection closed under the call (:func:`closed_under_the_call`)
    as :class:`BrokerError`: around a public call, so that no path inside it that meets the
    store's close passes aiormq's cancellation on to a caller that was not cancelled."""
    try:
        yield
    except BaseException as exc:
        if closed_under_the_call(exc):
            raise broker_error(doing, exc) from exc
        raise
