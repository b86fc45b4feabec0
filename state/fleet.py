"""The fleet calls of the contract (DESIGN.md rules 9 and 10, and retiring a device),
written once over a few primitives every backend implements.

Outcomes go through the one-command change every backend already has
(:meth:`IndexedStore.modify`, with :func:`amqp_queue.state.rules.reported`); rollouts and
retiring need set-wide primitives, each one atomic step of its backend.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from datetime import datetime

from . import rules
from .clock import Clock
from .errors import CommandNotFound, RolloutNotFound
from .model import CommandRecord, CommandStatus, Outcome, RolloutSummary
from .validation import (
    Limits,
    is_command_id,
    validate_actor,
    validate_reason,
    validate_result,
)

logger = logging.getLogger("amqp_queue.state")

Change = Callable[[CommandRecord], CommandRecord | None]
"""Computes a command's new record from its current one (None: unchanged); may raise.

It must be a pure function of the record: a backend may call it on another thread (SQLite's
writer) or more than once (a PostgreSQL transaction run again after a deadlock)."""


class FleetCalls(abc.ABC):
    """Outcomes, rollouts and retiring a device, for :class:`IndexedStore`."""

    limits: Limits
    clock: Clock

    @abc.abstractmethod
    async def modify(self, command_id: str, change: Change) -> CommandRecord:
        """See :meth:`IndexedStore.modify`."""

    @abc.abstractmethod
    async def get(self, command_id: str) -> CommandRecord | None:
        """See :meth:`IndexedStore.get`."""

    @abc.abstractmethod
    def _validate_device(self, device_id: object) -> str:
        """See :meth:`CommandIntake._validate_device`."""

    async def complete_command(self, command_id: str, result: bytes | None = None) -> None:
        """Records that the device carried the delivered command out: ``SUCCEEDED``.

        Args:
            result: what the device answered, kept with the record for the retention
                (bytes-like, at most ``Limits.max_payload_bytes``), or None.

        Raises:
            CommandNotFound: unknown or pruned id.
            OutcomeRejected: not delivered, or another outcome is recorded (the same report
                twice is harmless).
            InvalidPayload: ``result`` is not bytes-like or too large (nothing written).
        """
        data = validate_result(result, self.limits)
        await self.report(command_id, CommandStatus.SUCCEEDED, result=data)

    async def fail_command(self, command_id: str, reason: str) -> None:
        """Records that the device could not carry the delivered command out: ``FAILED``.

        Args:
            reason: why, kept with the record (at most ``Limits.max_reason_length``).

        Raises:
            CommandNotFound: unknown or pruned id.
            OutcomeRejected: not delivered, or another outcome is recorded (the same report
                twice is harmless).
            InvalidInput: ``reason`` is not a str or too long (nothing written).
        """
        text = validate_reason(reason, self.limits)
        await self.report(command_id, CommandStatus.FAILED, reason=text)

    async def report(
        self,
        command_id: str,
        outcome: CommandStatus,
        *,
        result: bytes | None = None,
        reason: str | None = None,
    ) -> tuple[CommandRecord, bool]:
        """Records a validated outcome (rule 9): the record as it now stands, and whether this
        call recorded it (False for the same report again)."""
        now = self.clock()
        changed = False

        def reporting(current: CommandRecord) -> CommandRecord | None:
            # As confirm_changed: run again after a lost answer, a change finds its own
            # earlier write (and it still counts as this call's); else the last run decides.
            nonlocal changed
            if changed and current.outcome is outcome and current.outcome_at == now:
                return None
            updated = rules.reported(current, outcome, now, result=result, reason=reason)
            changed = updated is not None
            return updated

        record = await self.modify(command_id, reporting)
        if changed:
            logger.info("command %s for device %s: %s", command_id, record.device_id, outcome)
        return record, changed

    async def get_outcome(self, command_id: str) -> Outcome | None:
        """The command's outcome; None while it has none (not delivered, or no report yet).

        Raises:
            CommandNotFound: unknown or pruned id.
        """
        return (await self.get_command(command_id)).to_outcome()

    async def get_command(self, command_id: str) -> CommandRecord:
        """Everything the store holds about one command, live or finished.

        Raises:
            CommandNotFound: unknown or pruned id.
        """
        check_command_id(command_id)
        record = await self.get(command_id)
        if record is None:
            raise CommandNotFound(command_id)
        return record

    async def confirm_rollout(self, rollout_id: str, *, by: str | None = None) -> int:
        """Confirms every command of a rollout still awaiting confirmation, at once.

        Members already confirmed, delivered, ended or expired are left as they are. ``by``
        (who confirms) is kept as each confirmed one's ``confirmed_by``.

        Returns:
            How many commands this call confirmed.

        Raises:
            RolloutNotFound: no command of this rollout is held.
        """
        return len(await self.confirm_members(rollout_id, by=by))

    async def confirm_members(
        self, rollout_id: str, *, by: str | None = None
    ) -> list[CommandRecord]:
        """:meth:`confirm_rollout`, returning the confirmed records (in write order)."""
        _check_rollout_id(rollout_id)
        by = validate_actor(by)
        confirmed = await self._confirm_rollout(rollout_id, self.clock(), by)
        if not confirmed:
            await self.rollout_summary(rollout_id)  # raises for an unknown rollout
        logger.info("confirmed %d commands of rollout %s", len(confirmed), rollout_id)
        return confirmed

    async def cancel_rollout(self, rollout_id: str, *, by: str | None = None) -> int:
        """Cancels every open, unexpired command of a rollout, at once.

        Members already delivered (with or without an outcome), ended or expired are left
        as they are. ``by`` (who cancels) is kept as each one's ``cancelled_by``.

        Returns:
            How many commands this call cancelled.

        Raises:
            RolloutNotFound: no command of this rollout is held.
        """
        _check_rollout_id(rollout_id)
        by = validate_actor(by)
        cancelled = await self._cancel_open(self.clock(), rollout_id=rollout_id, by=by)
        if not cancelled:
            await self.rollout_summary(rollout_id)
        logger.info("cancelled %d commands of rollout %s", cancelled, rollout_id)
        return cancelled

    async def rollout_summary(self, rollout_id: str) -> RolloutSummary:
        """How many of the rollout's commands are in each status, from one index query.

        Members pruned after the retention no longer count.

        Raises:
            RolloutNotFound: no command of this rollout is held.
        """
        _check_rollout_id(rollout_id)
        counts = await self._rollout_counts(rollout_id, self.clock())
        if not counts:
            raise RolloutNotFound(rollout_id)
        return RolloutSummary.of(rollout_id, counts)

    async def rollout_unpublished(self, rollout_id: str) -> list[str]:
        """Ids of the rollout's deliverable commands not yet marked published: a
        confirm of the rollout waits for those another call made ready."""
        _check_rollout_id(rollout_id)
        return await self._rollout_unpublished(rollout_id, self.clock())

    async def rollout_enqueuer(self, rollout_id: str) -> str | None:
        """Who enqueued the rollout (its ``by``; None when nobody was named): the four-eyes
        rule asks it before a confirmation.

        Raises:
            RolloutNotFound: no command of this rollout is held.
        """
        _check_rollout_id(rollout_id)
        found, enqueued_by = await self._rollout_enqueuer(rollout_id)
        if not found:
            raise RolloutNotFound(rollout_id)
        return enqueued_by

    async def retire_device(self, device_id: str) -> int:
        """Cancels every open, unexpired command of a device (they end ``CANCELLED``).

        Returns:
            How many commands it cancelled.

        Raises:
            InvalidDeviceId: a bad device id.
        """
        device = self._validate_device(device_id)
        cancelled = await self._cancel_open(self.clock(), device_id=device)
        logger.info("retired device %s: %d open commands cancelled", device, cancelled)
        return cancelled

    # -- primitives a backend implements -----------------------------------------------

    @abc.abstractmethod
    async def _confirm_rollout(
        self, rollout_id: str, now: datetime, by: str | None = None
    ) -> list[CommandRecord]:
        """Confirms the rollout's open, unexpired commands awaiting confirmation (setting
        ``confirmed_by`` to ``by``), atomically; returns them as they now stand, in write
        order."""

    @abc.abstractmethod
    async def _cancel_open(
        self,
        now: datetime,
        *,
        device_id: str | None = None,
        rollout_id: str | None = None,
        by: str | None = None,
    ) -> int:
        """Ends ``CANCELLED`` the open, unexpired commands of a device or of a rollout
        (exactly one is given), setting ``cancelled_by`` to ``by``, atomically; returns how
        many."""

    @abc.abstractmethod
    async def _rollout_counts(self, rollout_id: str, now: datetime) -> dict[CommandStatus, int]:
        """The rollout's held commands counted by status (no entry for a zero)."""

    @abc.abstractmethod
    async def _rollout_unpublished(self, rollout_id: str, now: datetime) -> list[str]:
        """Ids of the rollout's open, ready, unexpired commands without a publish mark."""

    @abc.abstractmethod
    async def _rollout_enqueuer(self, rollout_id: str) -> tuple[bool, str | None]:
        """Whether a command of the rollout is held, and who enqueued it (one call enqueues
        every command of a rollout, so any one answers for all)."""


def check_command_id(command_id: object) -> None:
    """Ids are UUIDs; anything else cannot name a command (and must not reach a UUID column)."""
    if not is_command_id(command_id):
        shown = command_id if isinstance(command_id, str) else f"<{type(command_id).__name__}>"
        raise CommandNotFound(shown, "not a command id")


def _check_rollout_id(rollout_id: object) -> None:
    if not is_command_id(rollout_id):
        shown = rollout_id if isinstance(rollout_id, str) else f"<{type(rollout_id).__name__}>"
        raise RolloutNotFound(shown)
