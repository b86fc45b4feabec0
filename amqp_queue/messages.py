"""The AMQP message of a command: what any consumer on existing infrastructure can read.

Properties:

- ``message_id``: the command id.
- ``delivery_mode``: 2 (persistent).
- ``expiration``: the TTL left when the message is published, in milliseconds rounded up
  (a command the relay publishes late gets what is left of its TTL, not all of it).
- ``timestamp``: the enqueue time, in whole seconds (AMQP carries no fraction), so two
  commands enqueued within a second share it: their order is the queue's order.
- ``type``: the command type; absent for a plain ``enqueue``.

The routing key of each delivery is the device id. Headers, for consumers that must judge a
message without the state index:

- ``x-command-type``: the command type; absent for a plain ``enqueue``.
- ``x-expires-at``: absolute expiry, integer milliseconds since the Unix epoch (UTC). A
  consumer must drop a message whose expiry has passed: classic queues drop expired
  messages only when they reach the head of the queue.
- ``x-requires-confirmation``: a boolean, true for a command of
  ``enqueue_with_confirmation`` (published only once an operator confirmed it), false
  otherwise.

Nothing else: every queued message stays in the broker's memory, once per device, so what a
consumer can learn otherwise (the device id is the routing key) is not repeated.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import aio_pika
from aio_pika.abc import DeliveryMode, HeadersType
from aiormq import spec

from amqp_queue.state.model import CommandRecord

COMMAND_TYPE = "x-command-type"
EXPIRES_AT = "x-expires-at"
REQUIRES_CONFIRMATION = "x-requires-confirmation"

_MILLISECOND = timedelta(milliseconds=1)
_PERSISTENT = int(DeliveryMode.PERSISTENT)


def remaining_ttl(record: CommandRecord, now: datetime) -> timedelta:
    """Time left before the command expires; not positive when it already has."""
    return record.expires_at - now


def _expiration_ms(record: CommandRecord, now: datetime) -> int:
    left_ms = math.ceil(remaining_ttl(record, now) / _MILLISECOND)
    if left_ms <= 0:
        raise ValueError(f"command {record.id} has expired; it must not be published")
    return left_ms


def _headers(record: CommandRecord) -> HeadersType:
    headers: HeadersType = {
        EXPIRES_AT: math.floor(record.expires_at.timestamp() * 1000),
        REQUIRES_CONFIRMATION: record.requires_confirmation,
    }
    if record.command_type is not None:
        headers[COMMAND_TYPE] = record.command_type
    return headers


def to_properties(record: CommandRecord, now: datetime) -> spec.Basic.Properties:
    """The message properties for a command that has time left at ``now``.

    What the publisher sends: built directly, without an ``aio_pika.Message`` per publish
    (the hot path of every enqueue).
    """
    return spec.Basic.Properties(
        message_id=record.id,
        delivery_mode=_PERSISTENT,
        expiration=str(_expiration_ms(record, now)),
        timestamp=record.created_at,
        message_type=record.command_type,
        headers=_headers(record),
    )


def to_message(record: CommandRecord, now: datetime) -> aio_pika.Message:
    """The same message as :func:`to_properties`, as an ``aio_pika.Message``."""
    return aio_pika.Message(
        body=record.payload,
        message_id=record.id,
        delivery_mode=DeliveryMode.PERSISTENT,
        expiration=timedelta(milliseconds=_expiration_ms(record, now)),
        timestamp=record.created_at,
        type=record.command_type,
        headers=_headers(record),
    )
