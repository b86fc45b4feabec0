"""A tap on the commands exchange: counts every publish, by command id.

A direct exchange hands a message to every queue bound with its routing key, so a queue of the
harness's own, bound with each device id beside the device queues, gets one copy of each
publish, the relay's and every store's alike. A command id seen twice was published twice.
The library is not asked: the count is the broker's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from types import TracebackType
from typing import Self

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.rabbitmq_support import AMQP_URL


class PublishTap:
    """Counts the publishes to ``exchange`` for ``devices`` while it is open.

    Publishes stay routable as before: the library declares a device's queue before its first
    publish to it, and the tap only adds a queue (exclusive: it goes with the tap's
    connection). Messages are taken at once, unacknowledged, so none expires in the tap.
    """

    def __init__(self, exchange: str, devices: list[str]) -> None:
        self._exchange = exchange
        self._devices = devices
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self.counts: Counter[str] = Counter()
        self.published: list[tuple[str, str]] = []
        """(device, command id) of each publish, in the order the broker routed them."""
        self._last = time.monotonic()

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await self._connection.channel()
            # As RabbitMQConfig() declares it (direct, durable); declaring it first is harmless.
            exchange = await channel.declare_exchange(
                self._exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for device in self._devices:
                await queue.bind(exchange, routing_key=device)
            await queue.consume(self._on_message, no_ack=True)
        except BaseException:
            await self._connection.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.counts[message.message_id or ""] += 1
        self.published.append((message.routing_key or "", message.message_id or ""))
        self._last = time.monotonic()

    async def settle(self, quiet: float = 0.3, within: float = 5.0) -> None:
        """Waits until no copy has come for ``quiet`` seconds (at most ``within``)."""
        give_up = time.monotonic() + within
        while True:
            now = time.monotonic()
            if now >= give_up or now - self._last >= quiet:
                return
            await asyncio.sleep(min(quiet - (now - self._last), give_up - now))

    @property
    def duplicates(self) -> int:
        """Publishes of a command beyond its first."""
        return sum(count - 1 for count in self.counts.values())
