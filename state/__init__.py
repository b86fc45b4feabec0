"""The durable state sidecar: the command index and its backends.

``state`` never imports ``amqp_queue``; the delivery layer builds on it.
"""

from state.base import DEFAULT_RETENTION, IndexedStore
from state.clock import Clock, utc_now
from state.errors import (
    BrokerError,
    CommandExpired,
    CommandNotFound,
    CommandRejected,
    InvalidCommandType,
    InvalidDeviceId,
    InvalidInput,
    InvalidPayload,
    InvalidTTL,
    OutboxTaken,
    QueueError,
    QueueMismatch,
    StateError,
)
from state.factory import DEFAULT_STATE_URL, open_state
from state.memory import MemoryStore
from state.model import CommandRecord, CommandStatus, EndReason, PendingCommand
from state.protocol import Store
from state.redis_store import RedisStore
from state.sql import SqlStore
from state.validation import DEFAULT_LIMITS, Limits, Ttl

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_RETENTION",
    "DEFAULT_STATE_URL",
    "BrokerError",
    "Clock",
    "CommandExpired",
    "CommandNotFound",
    "CommandRecord",
    "CommandRejected",
    "CommandStatus",
    "EndReason",
    "IndexedStore",
    "InvalidCommandType",
    "InvalidDeviceId",
    "InvalidInput",
    "InvalidPayload",
    "InvalidTTL",
    "Limits",
    "MemoryStore",
    "OutboxTaken",
    "PendingCommand",
    "QueueError",
    "QueueMismatch",
    "RedisStore",
    "SqlStore",
    "StateError",
    "Store",
    "Ttl",
    "open_state",
    "utc_now",
]
