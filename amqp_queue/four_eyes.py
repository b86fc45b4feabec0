"""The four-eyes rule of the operator API: a command (or a rollout) that needs confirmation
is not confirmed by the identity that enqueued it.

Enforced at the API, where identities are token names, over the record's ``enqueued_by``
(which never changes once written, so checking it before the confirm leaves no race). The
store stays policy-free: a library caller names whoever it likes as ``by``, and the rule is
the service's, switched on with ``--four-eyes`` / ``AMQP_QUEUE_FOUR_EYES``.
"""

from __future__ import annotations

from amqp_queue.state.errors import QueueError
from amqp_queue.state.model import CommandRecord, CommandStatus, RolloutSummary


class SelfApproval(QueueError):
    """Four eyes: the caller enqueued this command and may not confirm it too (HTTP 403)."""

    def __init__(
        self, command_id: str, identity: str = "the caller", *, what: str = "command"
    ) -> None:
        super().__init__(
            f"{what} {command_id!r} was enqueued by {identity!r}, who may not confirm it too "
            "(four-eyes rule): another approver must confirm it"
        )
        self.command_id = command_id
        self.identity = identity


def check_approver(record: CommandRecord, identity: str) -> None:
    """Refuses ``identity`` confirming ``record`` when it enqueued it.

    Only a command still awaiting confirmation is refused: confirming one that needs no
    confirmation, or is confirmed already, changes nothing and stays harmless.

    Raises:
        SelfApproval: ``identity`` enqueued the command.
    """
    awaiting = record.is_open and record.requires_confirmation and not record.confirmed
    if awaiting and record.enqueued_by == identity:
        raise SelfApproval(record.id, identity)


def check_rollout_approver(summary: RolloutSummary, enqueued_by: str | None, identity: str) -> None:
    """Refuses ``identity`` confirming a rollout it created, as :func:`check_approver` does
    a command: only while some of its commands await confirmation.

    Raises:
        SelfApproval: ``identity`` created the rollout.
    """
    awaiting = summary.counts[CommandStatus.AWAITING_CONFIRMATION]
    if awaiting and enqueued_by == identity:
        raise SelfApproval(summary.rollout_id, identity, what="rollout")
