"""Connecting to the broker: one robust connection, retried with backoff within a deadline."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from amqp_queue.errors import BrokerError, broker_errors


async def connect_robust(url: str, give_up_after: float) -> AbstractRobustConnection:
    """A robust connection to ``url``, tried again with backoff for ``give_up_after`` seconds.

    Raises:
        BrokerError: the broker could not be reached in time (the message names the URL
            without its password).
    """
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(BrokerError),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        stop=stop_after_delay(give_up_after),
        reraise=True,
    ):
        with attempt, broker_errors(f"connecting to {redact(url)}"):
            return await aio_pika.connect_robust(url)
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def connecting_robust(url: str) -> tuple[AbstractRobustConnection, asyncio.Task[None]]:
    """A robust connection to ``url`` that keeps trying in the background from the start.

    For a process that must come up while the broker is down (the sidecar): the connection
    exists at once, and the task completes when it first connects; cancel it on shutdown.
    aio-pika logs each failed attempt as a warning.
    """
    connection = aio_pika.RobustConnection(make_url(url), fail_fast=False)
    first = asyncio.create_task(connection.connect(), name="amqp_queue.connect")
    return connection, first
