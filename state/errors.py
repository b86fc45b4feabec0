"""The one exception tree of amqp-queue.

::

    QueueError
    ├── InvalidInput (also ValueError)          bad input, nothing was written
    │   ├── InvalidDeviceId
    │   ├── InvalidCommandType
    │   ├── InvalidPayload
    │   └── InvalidTTL
    ├── CommandNotFound                         unknown, pruned or finished command id
    │   └── CommandExpired                      the command exists but its TTL ran out
    ├── RolloutNotFound                         no command of this rollout is held
    ├── OutcomeRejected                         not delivered, or another outcome is recorded
    ├── QueueFull                               the device holds its maximum of open commands
    ├── StateError                              the state backend failed (SQL, Redis)
    │   └── ClaimOutcomeUnknown                 a claim may or may not have taken effect
    ├── OutboxTaken                             the index publishes for another exchange
    ├── BrokerError          (amqp_queue.errors) RabbitMQ failed
    │   └── CommandRejected  (amqp_queue.errors) refused for good (over the message size)
    └── QueueMismatch        (amqp_queue.errors) a device queue exists with other settings

The state layer defines the root and its own errors; the delivery side's errors (the broker's)
derive from the same root in :mod:`amqp_queue.errors`, so the state layer holds no delivery
words and callers still catch ``QueueError`` for everything.

Third-party errors are translated at the boundary with ``raise ... from exc`` so callers
catch ``QueueError`` and still see the original cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import CommandRecord


class QueueError(Exception):
    """Root of every error amqp-queue raises."""


class InvalidInput(QueueError, ValueError):
    """Input was rejected before anything was written."""


class InvalidDeviceId(InvalidInput):
    """The device id is empty, too long or has characters an AMQP queue name cannot hold."""


class InvalidCommandType(InvalidInput):
    """The command type is empty, too long or has characters that are not allowed."""


class InvalidPayload(InvalidInput):
    """The payload is not bytes-like or is larger than the configured limit."""


class InvalidTTL(InvalidInput):
    """The ttl is not a positive, finite duration within the configured maximum."""


class CommandNotFound(QueueError):
    """No live command has this id: never known, pruned, or already finished."""

    def __init__(self, command_id: str, reason: str = "not found") -> None:
        super().__init__(f"command {command_id!r}: {reason}")
        self.command_id = command_id
        self.reason = reason


class CommandExpired(CommandNotFound):
    """The command's time to live ran out; it will never be delivered."""

    def __init__(self, command_id: str) -> None:
        super().__init__(command_id, "expired")


class RolloutNotFound(QueueError):
    """No command of this rollout is held: never known, or every member was pruned."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(f"rollout {rollout_id!r}: not found")
        self.rollout_id = rollout_id


class OutcomeRejected(QueueError):
    """An outcome report the command cannot take (DESIGN.md rule 9): it was never delivered
    (awaiting, pending or ended without delivery), or it already has another outcome.

    The same report twice is not an error.
    """

    def __init__(self, command_id: str, reason: str = "not delivered") -> None:
        super().__init__(f"command {command_id!r}: outcome refused, {reason}")
        self.command_id = command_id
        self.reason = reason


class QueueFull(QueueError):
    """An enqueue would take a device over ``Limits.max_pending_per_device`` open commands
    (DESIGN.md rule 11); nothing was written."""

    def __init__(self, device_id: str, limit: int | None = None) -> None:
        most = "its limit of" if limit is None else f"its limit of {limit}"
        super().__init__(
            f"device {device_id!r} already holds {most} open commands "
            "(awaiting confirmation or pending)"
        )
        self.device_id = device_id
        self.limit = limit


class StateError(QueueError):
    """The state backend (SQL database, Redis) failed; the operation did not take effect."""


class ClaimOutcomeUnknown(StateError):
    """A claim failed at its COMMIT and the index could not tell whether it landed.

    ``records`` are the commands it claimed if it did: claimed as far as the index goes, or
    still open. A drain hands over what the claim did take (the hand-over leaves the rest
    alone) and leaves their messages queued: the next drain drops the handed-over ones as
    delivered and hands out the rest. Neither a loss nor a copy.
    """

    def __init__(self, message: str, records: Sequence[CommandRecord] = ()) -> None:
        super().__init__(message)
        self.records = list(records)


class OutboxTaken(QueueError):
    """The state index's outbox already belongs to another publisher (another exchange).

    Each store's relay publishes every unpublished command of its index, so two exchanges on
    one index would publish each other's commands into the wrong queues. Give each its own
    index: another SQLite file, PostgreSQL ``?schema=``, or Redis ``?prefix=``.
    """
