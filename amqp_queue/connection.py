"""Connecting to the broker: one robust connection, retried with backoff within a deadline."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from amqp_queue.errors import BROKER_FAILURES, BrokerError

# Even the last attempt gets this long: a broker that is up answers a connect well within it.
_SHORTEST_ATTEMPT = 0.5


async def connect_robust(url: str, give_up_after: float) -> AbstractRobustConnection:
    """A robust connection to ``url``, tried again with backoff for ``give_up_after`` seconds.

    The deadline holds: no pause between attempts runs past it, and an attempt that gets no
    answer (a port that accepts and then says nothing) is cut off at it.

    Raises:
        BrokerError: the broker could not be reached in time (the message names the URL
            without its password).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    backoff = wait_exponential(multiplier=0.2, max=5.0)

    def pause(state: RetryCallState) -> float:
        return max(0.0, min(backoff(state), deadline - loop.time()))

    def past_deadline(state: RetryCallState) -> bool:
        return loop.time() >= deadline

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(BrokerError), wait=pause, stop=past_deadline, reraise=True
    )
    try:
        async for attempt in retrying:
            with attempt:
                timeout = max(_SHORTEST_ATTEMPT, deadline - loop.time())
                try:
                    return await aio_pika.connect_robust(url, timeout=timeout)
                except TimeoutError as exc:
                    raise BrokerError(f"no answer in {timeout:.1f}s") from exc
                except BROKER_FAILURES as exc:
                    raise BrokerError(f"{type(exc).__name__}: {exc}") from exc
    except BrokerError as exc:
        tries = retrying.statistics.get("attempt_number", 1)
        raise BrokerError(
            f"cannot connect to the broker at {redact(url)} within {give_up_after:g}s "
            f"({tries} {'try' if tries == 1 else 'tries'}): {exc}"
        ) from exc
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
