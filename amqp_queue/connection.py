"""Connecting to the broker: a robust connection over one node or several, with a deadline.

A broker address is one AMQP URL, or several (a list, or one string with commas between
them: the nodes of a cluster). Each connection attempt, the first and every reconnect after
a lost connection, goes to the next node in turn, so a store fails over to another node
when the one it used goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential
from yarl import URL

from amqp_queue.errors import BROKER_FAILURES, BrokerError
from amqp_queue.state.cancellation import finished, undone

# Even the last attempt gets this long: a broker that is up answers a connect well within it.
_SHORTEST_ATTEMPT = 0.5


BrokerUrls = str | Sequence[str]
"""One AMQP URL, several, or one string of URLs separated by commas."""


def broker_urls(urls: BrokerUrls) -> list[URL]:
    """The node URLs of a broker address.

    Raises:
        ValueError: no URL, or one that is not ``amqp://`` or ``amqps://`` with a host.
    """
    given = urls.split(",") if isinstance(urls, str) else list(urls)
    nodes = [part.strip() for part in given if part.strip()]
    if not nodes:
        raise ValueError("no broker URL given (one amqp:// URL, or several separated by commas)")
    parsed = []
    for node in nodes:
        url = URL(node)
        if url.scheme not in ("amqp", "amqps") or not url.host:
            raise ValueError(
                f"{redact(node)!r} is not a broker URL: each node is amqp://user:pass@host:port/"
            )
        parsed.append(url)
    return parsed


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection that tries the broker's nodes in turn, one per connection attempt.

    aio-pika reconnects to the one URL it was given; this one moves to the next node at each
    attempt (the reconnect loop clears ``transport`` before every attempt, which is where the
    URL turns). Settings in the first URL's query (``heartbeat``, ``reconnect_interval``)
    apply to every node.
    """

    def __init__(self, nodes: Sequence[URL], *, first: int = 0, **kwargs: Any) -> None:
        self._nodes = list(nodes)
        super().__init__(self._nodes[0], **kwargs)
        self._turn = first

    @property
    def nodes(self) -> list[URL]:
        """The broker's node URLs, in the order they are tried."""
        return list(self._nodes)

    @property
    def transport(self) -> Any:
        return self.__dict__.get("_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        nodes = self.__dict__.get("_nodes")
        if value is None and nodes and "_turn" in self.__dict__:
            self.url = nodes[self._turn % len(nodes)]
            self._turn += 1
        self.__dict__["_transport"] = value


async def connect_robust(url: BrokerUrls, give_up_after: float) -> AbstractRobustConnection:
    """A robust connection to ``url`` (one node or several, tried in turn), tried again with
    backoff for ``give_up_after`` seconds.

    The deadline holds: no pause between attempts runs past it, and an attempt that gets no
    answer (a port that accepts and then says nothing) is cut off at it.

    Raises:
        BrokerError: the broker could not be reached in time (the message names the URL
            without its password).
    """
    nodes = broker_urls(url)
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
                tried = retrying.statistics.get("attempt_number", 1) - 1
                connection = FailoverConnection(nodes, first=tried)
                try:
                    # Run to its end (bounded by timeout) through the caller's cancellation,
                    # then closed: a handshake cut half way left a connection nothing could
                    # close any more, open on the broker with its tasks for the life of the
                    # process.
                    _, cut = await finished(connection.connect(timeout=timeout))
                except TimeoutError as exc:
                    await _discard(connection)
                    raise BrokerError(f"no answer in {timeout:.1f}s") from exc
                except BROKER_FAILURES as exc:
                    await _discard(connection)
                    raise BrokerError(f"{type(exc).__name__}: {exc}") from exc
                except asyncio.CancelledError:
                    cut = True
                if cut:
                    await undone(_discard, connection)
                return connection
    except BrokerError as exc:
        tries = retrying.statistics.get("attempt_number", 1)
        raise BrokerError(
            f"cannot connect to the broker at {_shown(nodes)} within {give_up_after:g}s "
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


async def _discard(connection: AbstractRobustConnection) -> None:
    """Closes a connection whose first attempt failed, so nothing of it lingers."""
    with contextlib.suppress(*BROKER_FAILURES, RuntimeError):
        await connection.close()


def _shown(nodes: Sequence[URL]) -> str:
    return ",".join(redact(str(node)) for node in nodes)


def connecting_robust(url: BrokerUrls) -> tuple[AbstractRobustConnection, asyncio.Task[None]]:
    """A robust connection to ``url`` that keeps trying in the background from the start.

    For a process that must come up while the broker is down (the sidecar): the connection
    exists at once, and the task completes when it first connects; cancel it on shutdown.
    aio-pika logs each failed attempt as a warning.
    """
    connection = FailoverConnection(broker_urls(url), fail_fast=False)
    first = asyncio.create_task(connection.connect(), name="amqp_queue.connect")
    return connection, first
