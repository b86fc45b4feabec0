"""amqp-queue: an offline command queue for devices, delivered over RabbitMQ.

The one public import point: the contract, the errors and every store.
"""

from state import (
    DEFAULT_LIMITS,
    BrokerError,
    CommandExpired,
    CommandNotFound,
    CommandStatus,
    InvalidCommandType,
    InvalidDeviceId,
    InvalidInput,
    InvalidPayload,
    InvalidTTL,
    Limits,
    MemoryStore,
    PendingCommand,
    QueueError,
    SqlStore,
    StateError,
    Store,
    Ttl,
)

__all__ = [
    "DEFAULT_LIMITS",
    "BrokerError",
    "CommandExpired",
    "CommandNotFound",
    "CommandStatus",
    "InvalidCommandType",
    "InvalidDeviceId",
    "InvalidInput",
    "InvalidPayload",
    "InvalidTTL",
    "Limits",
    "MemoryStore",
    "PendingCommand",
    "QueueError",
    "SqlStore",
    "StateError",
    "Store",
    "Ttl",
]
