"""amqp-queue: an offline command queue for devices, delivered over RabbitMQ.

The one public import point: the contract, the errors and every store.
"""

from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.errors import BrokerError, CommandRejected, QueueMismatch
from amqp_queue.observer import Observer
from amqp_queue.received import ReceivedCommand
from amqp_queue.state import (
    DEFAULT_LIMITS,
    ClaimOutcomeUnknown,
    CommandExpired,
    CommandNotFound,
    CommandStatus,
    DeviceSummary,
    InvalidCommandType,
    InvalidDeviceId,
    InvalidInput,
    InvalidPayload,
    InvalidTTL,
    Limits,
    MemoryStore,
    OutboxTaken,
    Outcome,
    OutcomeRejected,
    OutcomeTimeout,
    PendingCommand,
    QueueError,
    QueueFull,
    RedisStore,
    Rollout,
    RolloutNotFound,
    RolloutSummary,
    SqlStore,
    StateError,
    Store,
    Ttl,
)
from amqp_queue.store import RabbitMQStore
from amqp_queue.stream import CommandStream

__all__ = [
    "DEFAULT_LIMITS",
    "BrokerError",
    "ClaimOutcomeUnknown",
    "CommandExpired",
    "CommandNotFound",
    "CommandRejected",
    "CommandStatus",
    "CommandStream",
    "DeviceSummary",
    "InvalidCommandType",
    "InvalidDeviceId",
    "InvalidInput",
    "InvalidPayload",
    "InvalidTTL",
    "Limits",
    "MemoryStore",
    "Observer",
    "OutboxTaken",
    "Outcome",
    "OutcomeRejected",
    "OutcomeTimeout",
    "PendingCommand",
    "QueueError",
    "QueueFull",
    "QueueMismatch",
    "QueueType",
    "RabbitMQConfig",
    "RabbitMQStore",
    "ReceivedCommand",
    "RedisStore",
    "Rollout",
    "RolloutNotFound",
    "RolloutSummary",
    "SqlStore",
    "StateError",
    "Store",
    "Ttl",
]
