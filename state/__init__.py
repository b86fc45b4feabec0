"""The durable state sidecar: the command index and its backends.

``state`` never imports ``amqp_queue``; the delivery layer builds on it.
"""

from .clock import Clock, utc_now
from .enqueue_calls import OutcomeTimeout
from .errors import (
    ClaimOutcomeUnknown,
    CommandExpired,
    CommandNotFound,
    InvalidCommandType,
    InvalidDeviceId,
    InvalidInput,
    InvalidPayload,
    InvalidTTL,
    OutboxTaken,
    OutcomeRejected,
    QueueError,
    QueueFull,
    RolloutNotFound,
    StateError,
)
from .factory import DEFAULT_STATE_URL, open_state
from .indexed_store import DEFAULT_RETENTION, IndexedStore
from .memory import MemoryStore
from .model import (
    CommandRecord,
    CommandStatus,
    DeviceSummary,
    EndReason,
    Outcome,
    PendingCommand,
    Rollout,
    RolloutSummary,
    Sweep,
)
from .protocol import Store
from .redis_store import RedisStore
from .sql import SqlStore
from .validation import DEFAULT_LIMITS, Limits, Ttl

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_RETENTION",
    "DEFAULT_STATE_URL",
    "ClaimOutcomeUnknown",
    "Clock",
    "CommandExpired",
    "CommandNotFound",
    "CommandRecord",
    "CommandStatus",
    "DeviceSummary",
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
    "Outcome",
    "OutcomeRejected",
    "OutcomeTimeout",
    "PendingCommand",
    "QueueError",
    "QueueFull",
    "RedisStore",
    "Rollout",
    "RolloutNotFound",
    "RolloutSummary",
    "SqlStore",
    "StateError",
    "Store",
    "Sweep",
    "Ttl",
    "open_state",
    "utc_now",
]
