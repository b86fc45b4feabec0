"""Translation of aio-pika and aiormq errors into the QueueError tree, at the boundary."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import aio_pika.exceptions
import aiormq.exceptions

from state.errors import BrokerError

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


def broker_error(doing: str, exc: BaseException) -> BrokerError:
    """The :class:`BrokerError` for a broker failure ``exc`` while ``doing`` something."""
    return BrokerError(f"{doing} failed: {type(exc).__name__}: {exc}")


@contextmanager
def broker_errors(doing: str) -> Iterator[None]:
    """Re-raises broker failures as :class:`BrokerError` naming what was being done."""
    try:
        yield
    except BROKER_FAILURES as exc:
        raise broker_error(doing, exc) from exc
