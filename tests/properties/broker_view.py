"""What the broker holds, seen from outside a store: did a rejected call declare a queue?"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import aiormq.exceptions

from tests.rabbitmq_support import AMQP_URL

AMQP_MAX_NAME_BYTES = 255


class BrokerView:
    """Passive queue look-ups on a plain connection of its own."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[BrokerView]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            yield cls(connection)

    async def queue_exists(self, name: str) -> bool:
        """A passive declare: the broker answers 404 for a queue it does not have."""
        try:
            encoded = name.encode()
        except UnicodeEncodeError:
            return False  # a lone surrogate: no UTF-8 name, so no queue can have it
        if len(encoded) > AMQP_MAX_NAME_BYTES:
            return False  # AMQP cannot name such a queue at all
        channel = await self._connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        except ValueError:
            return False  # the client refuses the name, so no client of ours declared it
        finally:
            if not channel.is_closed:
                await channel.close()
        return True


def queues_named_with_prefix(prefix: str) -> list[str]:
    """Every queue on the broker whose name starts with ``prefix`` (rabbitmqctl, any client)."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [name for name in listing.splitlines() if name.startswith(prefix)]
