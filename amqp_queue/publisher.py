"""Publishes ready commands with publisher confirms, into queues known to exist."""

from __future__ import annotations

import asyncio
import logging

from aiormq import spec
from aiormq.abc import ConfirmationFrameType, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError

from amqp_queue.config import RabbitMQConfig
from amqp_queue.errors import (
    BROKER_FAILURES,
    BrokerError,
    CommandRejected,
    broker_error,
    size_refused,
)
from amqp_queue.messages import to_properties
from amqp_queue.state.clock import Clock
from amqp_queue.state.model import CommandRecord
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.publisher")


class Publisher:
    """Publishes one command and returns once the broker confirmed it.

    Publishes run concurrently on one confirming channel: each awaits only its own confirm,
    so many are in flight at once.
    """

    def __init__(self, topology: Topology, config: RabbitMQConfig, clock: Clock) -> None:
        self._topology = topology
        self._config = config
        self._clock = clock

    async def publish(self, record: CommandRecord) -> bool:
        """Publishes ``record``; False when it expired before it could be published.

        Raises:
            CommandRejected: the broker refused it for good (over its max_message_size);
                publishing it again would fail the same way.
            QueueMismatch: the device's queue exists with another queue type or durability.
            BrokerError: the broker did not confirm it (down, timed out, unroutable twice).
        """
        for attempt in (1, 2):
            now = self._clock()
            if record.expires_at <= now:
                return False
            await self._topology.ensure_queue(record.device_id)
            properties = to_properties(record, now)
            # Not broker_errors(): on the path of every enqueue, the message is built only
            # when there is a failure to name.
            try:
                async with asyncio.timeout(self._config.publish_timeout):
                    result = await self._basic_publish(record, properties)
            except BROKER_FAILURES as exc:
                limit = size_refused(exc)
                if limit is not None and len(record.payload) > limit:
                    raise CommandRejected(
                        record.id,
                        f"its {len(record.payload)} bytes are over the broker's "
                        f"max_message_size of {limit}",
                    ) from exc
                raise broker_error(f"publishing command {record.id}", exc) from exc
            if not isinstance(result, DeliveredMessage):
                return True
            # Returned unroutable: the cached queue is gone (deleted behind our back).
            logger.warning(
                "command %s came back unroutable (attempt %d); declaring %s again",
                record.id,
                attempt,
                self._config.queue_name(record.device_id),
            )
            self._topology.forget(record.device_id)
        raise BrokerError(f"command {record.id} is unroutable to device {record.device_id!r}")

    async def _basic_publish(
        self, record: CommandRecord, properties: spec.Basic.Properties
    ) -> ConfirmationFrameType | DeliveredMessage | None:
        """What ``Exchange.publish`` does, minus an ``aio_pika.Message`` per command."""
        channel = self._topology.channel
        if channel.is_closed:
            raise ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        return await underlay.basic_publish(
            record.payload,
            exchange=self._config.exchange,
            routing_key=record.device_id,
            properties=properties,
            mandatory=True,
        )
