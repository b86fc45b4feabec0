"""Publishes ready commands with publisher confirms, into queues known to exist."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import OrderedDict

from aiormq import spec
from aiormq.abc import AbstractConnection, ConfirmationFrameType, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError

from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.errors import (
    BROKER_FAILURES,
    BrokerError,
    CommandRejected,
    QueueMismatch,
    broker_error,
    closed_under_the_call,
    size_refused,
)
from amqp_queue.messages import to_properties
from amqp_queue.state.clock import Clock
from amqp_queue.state.model import CommandRecord
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.publisher")

_CONFIRMED_LATE_MOST = 10_000
"""Late confirms remembered: one per command still owed, far more than a relay pass holds."""

_REDECLARED_MOST = 3
"""Declarations a quorum publish makes again when its queue's deletion began after the last
(a bound, should a tiny ``declared_cache`` keep evicting it)."""

_Send = asyncio.Future[ConfirmationFrameType | DeliveredMessage | None]
"""A command's send: the broker's confirmation, or the message back (unroutable)."""


class Publisher:
    """Publishes one command and returns once the broker confirmed it.

    Publishes run concurrently on one confirming channel: each awaits only its own confirm,
    so many are in flight at once. On quorum queues only one per device is: across a
    leader change the broker nacks some publishes and confirms later ones to the same
    queue, so a later command must not be sent before the earlier one is confirmed (see
    :meth:`publish`).
    """

    def __init__(self, topology: Topology, config: RabbitMQConfig, clock: Clock) -> None:
        self._topology = topology
        self._config = config
        self._clock = clock
        self._one_at_a_time = config.queue_type is QueueType.QUORUM
        # Per device, the outcome of its latest publish under way (quorum queues): True once
        # confirmed (or not needed), False once it failed.
        self._latest: dict[str, asyncio.Future[bool]] = {}
        # By command id, its send under way (see _sent): timed out for its caller, it goes on.
        self._sending: dict[str, _Send] = {}
        # Sends confirmed after their callers stopped waiting (see _sent), oldest first.
        self._confirmed_late: OrderedDict[str, ConfirmationFrameType | None] = OrderedDict()
        # Sends under way whose callers stopped waiting: remembered once they are confirmed.
        self._left: set[str] = set()
        # The connection whose close ends the sends under way (see _watch).
        self._watched: object = None

    async def publish(self, record: CommandRecord) -> bool:
        """Publishes ``record``; False when it expired before it could be published.

        On quorum queues it is sent only once the publish called before it for the same
        device is confirmed; should that one fail, this one fails too, unsent: published
        after it, it would overtake it in the queue once that one is published again.

        Raises:
            CommandRejected: the broker refused it for good (over its max_message_size);
                publishing it again would fail the same way.
            QueueMismatch: the device's queue exists with another queue type or durability.
            BrokerError: the broker did not confirm it (down, timed out, unroutable twice),
                or did not confirm the command published before it to the same device.
        """
        if not self._one_at_a_time:
            return await self._publish(record)
        device = record.device_id
        # Taken in call order, before anything is awaited: the order the device's commands
        # were handed to the publisher is the order they reach its queue.
        ahead = self._latest.get(device)
        mine = asyncio.get_running_loop().create_future()
        self._latest[device] = mine
        settled = False
        try:
            if ahead is not None and not await asyncio.shield(ahead):
                raise BrokerError(
                    f"command {record.id} not published: an earlier command to device "
                    f"{device!r} was not confirmed"
                )
            published = await self._publish(record)
            settled = True
            return published
        except (CommandRejected, QueueMismatch):
            # Not published by this process: nothing to wait for behind it (a queue of other
            # settings refuses the commands behind it too).
            settled = True
            raise
        finally:
            mine.set_result(settled)
            if self._latest.get(device) is mine:
                del self._latest[device]

    async def _publish(self, record: CommandRecord) -> bool:
        for attempt in (1, 2):
            now = self._clock()
            if record.expires_at <= now:
                return False
            declaration = await self._topology.ensure_queue(record.device_id)
            for _ in range(_REDECLARED_MOST if self._one_at_a_time else 0):
                if self._topology.declared(record.device_id, declaration):
                    break
                # A deletion of the queue (a retire) began after its declaration: declared
                # again once it ended, not sent to the queue it deletes (see _sent).
                declaration = await self._topology.ensure_queue(record.device_id)
            properties = to_properties(record, now)
            # Not broker_errors(): on the path of every enqueue, the message is built only
            # when there is a failure to name.
            try:
                result = await self._sent(record, properties)
            except BROKER_FAILURES as exc:
                limit = size_refused(exc)
                if limit is not None and len(record.payload) > limit:
                    raise CommandRejected(
                        record.id,
                        f"its {len(record.payload)} bytes are over the broker's "
                        f"max_message_size of {limit}",
                    ) from exc
                raise broker_error(f"publishing command {record.id}", exc) from exc
            except BaseException as exc:
                # The store closing its channel under the publish: owed, not the caller's
                # cancellation (see closed_under_the_call).
                if closed_under_the_call(exc):
                    raise broker_error(f"publishing command {record.id}", exc) from exc
                raise
            if not isinstance(result, DeliveredMessage):
                return True
            # Returned unroutable: the cached queue is gone (deleted behind our back).
            logger.warning(
                "command %s came back unroutable (attempt %d); declaring %s again",
                record.id,
                attempt,
                self._config.queue_name(record.device_id),
            )
            self._topology.forget(record.device_id, declaration)
        raise BrokerError(f"command {record.id} is unroutable to device {record.device_id!r}")

    async def _sent(
        self, record: CommandRecord, properties: spec.Basic.Properties
    ) -> ConfirmationFrameType | DeliveredMessage | None:
        """Sends the command (or joins its send still under way: the relay publishing it
        again) and waits ``publish_timeout`` at most for the broker's answer.

        A send whose time runs out goes on: it keeps its turn on the channel. aiormq sends
        one publish at a time and holds the channel until the frame is written, so over a
        congested link publishes wait their turn; withdrawn while it waited (unsent), a
        command let the one behind it, to the same device, go out first, and published
        again after it, reached the queue second (tests/test_publish_turn_timeout.py). It
        ends with the channel at the latest. A call that joins a send gets that send's
        message as it was built (its TTL worked out then: the index judges expiry anyway).
        """
        if record.id in self._confirmed_late:  # its caller had left: not sent again
            return self._confirmed_late.pop(record.id)
        sending = self._sending.get(record.id)
        if sending is None:
            sending = asyncio.ensure_future(self._basic_publish(record, properties))
            self._sending[record.id] = sending
            sending.add_done_callback(functools.partial(self._send_ended, record.id))
            if self._one_at_a_time:
                # Until the send ends, however long its caller waits: RabbitMQ 3.10 deleting
                # a quorum queue with a publish to it in flight closes the connection, and
                # sometimes leaves the queue's name undeclarable (a retire waits for it).
                self._topology.in_use_until(record.device_id, sending)
        try:
            async with asyncio.timeout(self._config.publish_timeout):
                answer = await asyncio.shield(sending)
        except BaseException:
            # Timed out or cancelled: the send goes on, and its answer is kept for the
            # relay's next publish of it (only then: a send answered in time costs nothing).
            if sending.done():
                self._remember(record.id, sending)
            else:
                self._left.add(record.id)
            raise
        if self._confirmed_late:
            # An earlier caller of this send left: answered here, its answer is taken.
            self._confirmed_late.pop(record.id, None)
        return answer

    def _send_ended(self, command_id: str, sending: _Send) -> None:
        if self._sending.get(command_id) is sending:
            del self._sending[command_id]
        if command_id in self._left:
            self._left.discard(command_id)
            self._remember(command_id, sending)

    def _remember(self, command_id: str, sending: _Send) -> None:
        """Keeps a send's confirmation for the relay's next publish of the command."""
        if sending.cancelled() or sending.exception() is not None:
            return  # retrieved: its callers were told, or had left
        answer = sending.result()
        if not isinstance(answer, DeliveredMessage):
            # Until the relay's next publish of it takes it; the oldest go first.
            self._confirmed_late[command_id] = answer
            while len(self._confirmed_late) > _CONFIRMED_LATE_MOST:
                self._confirmed_late.popitem(last=False)

    async def _basic_publish(
        self, record: CommandRecord, properties: spec.Basic.Properties
    ) -> ConfirmationFrameType | DeliveredMessage | None:
        """What ``Exchange.publish`` does, minus an ``aio_pika.Message`` per command."""
        channel = self._topology.channel
        if channel.is_closed:
            raise ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        self._watch(underlay.connection)
        return await underlay.basic_publish(
            record.payload,
            exchange=self._config.exchange,
            routing_key=record.device_id,
            properties=properties,
            mandatory=True,
        )

    def _watch(self, connection: AbstractConnection) -> None:
        """Ends the sends under way when ``connection`` closes (see ``unless_closed``).

        Publishes in flight when the store closed answered ``publish_timeout`` after
        ``close()`` returned: they waited for aiormq's channel lock behind a frame that
        waited for room in the closed connection's buffer, which nothing makes any more.
        One callback per connection, not a race per publish: that cost 12 µs a publish.
        Their callers see a broker failure (``closed_under_the_call``)."""
        if connection is self._watched:
            return
        self._watched = connection
        connection.closing.add_done_callback(lambda _: self._end_sends())

    def _end_sends(self) -> None:
        for sending in list(self._sending.values()):
            sending.cancel()
