"""The enqueue calls of the contract, written once for every store.

Each store differs only in how it accepts validated records (:meth:`CommandIntake._accept`,
:meth:`CommandIntake._accept_many`): an index backend writes them; a store built on an index
(the delivery side's) writes them there and then hands on those that are ready.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Iterable, Sequence

from . import rules
from .clock import Clock
from .errors import InvalidDeviceId, InvalidInput
from .model import CommandRecord, Rollout
from .validation import Limits, Ttl, validate_command_type, validate_device_id

OutcomeTimeout = Ttl | None
"""An outcome deadline after delivery: seconds, a ``timedelta``, or None for none."""


class CommandIntake(abc.ABC):
    """The enqueue calls over ``_accept`` and ``_accept_many``.

    A subclass sets ``limits`` and ``clock`` and implements both; it may tighten
    :meth:`_validate_device` (the delivery side: the device's queue name must fit).

    Every enqueue takes an optional keyword-only ``outcome_timeout`` (seconds or a
    ``timedelta``, positive, at most ``Limits.max_ttl``): a command delivered and given no
    outcome within it after delivery ends ``TIMED_OUT`` at ``cleanup`` (rule 9). Each also
    takes an optional keyword-only ``by``: who enqueues it, kept as the record's
    ``enqueued_by`` (the API passes its token's name).
    """

    limits: Limits
    clock: Clock

    async def enqueue(
        self,
        device_id: str,
        payload: bytes,
        ttl: Ttl,
        *,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> str:
        """Queues a command that is ready at once.

        Raises:
            InvalidInput: bad input (nothing written).
            QueueFull: the device holds ``Limits.max_pending_per_device`` open commands.
        """
        record = self.build(device_id, None, payload, ttl, outcome_timeout=outcome_timeout, by=by)
        return await self._accept(record)

    async def enqueue_or_update(
        self,
        device_id: str,
        command_type: str,
        payload: bytes,
        ttl: Ttl,
        *,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> str:
        """Queues a command replacing the open one of its type (a replacement is not an
        addition to the device's limit).

        Raises:
            InvalidInput: bad input (nothing written).
            QueueFull: the device is at its limit and no command of this type is open.
        """
        validate_command_type(command_type, self.limits)
        record = self.build(
            device_id, command_type, payload, ttl, outcome_timeout=outcome_timeout, by=by
        )
        return await self._accept(record)

    async def enqueue_with_confirmation(
        self,
        device_id: str,
        command_type: str,
        payload: bytes,
        ttl: Ttl,
        *,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> str:
        """Queues a command delivered only after ``confirm_command``; replaces by type.

        Raises:
            InvalidInput: bad input (nothing written).
            QueueFull: the device is at its limit and no command of this type is open.
        """
        validate_command_type(command_type, self.limits)
        record = self.build(
            device_id,
            command_type,
            payload,
            ttl,
            requires_confirmation=True,
            outcome_timeout=outcome_timeout,
            by=by,
        )
        return await self._accept(record)

    async def enqueue_many(
        self,
        device_ids: Iterable[str],
        payload: bytes,
        ttl: Ttl,
        *,
        command_type: str | None = None,
        requires_confirmation: bool = False,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> Rollout:
        """Queues one command (the same payload) for each device, in one atomic write (rule 10).

        With ``command_type`` each replaces its device's open command of that type (rule 3);
        ``requires_confirmation`` needs a ``command_type`` and makes the commands wait for
        ``confirm_rollout`` (or ``confirm_command`` one by one).

        Returns:
            The rollout: its id (for ``confirm_rollout``, ``cancel_rollout``,
            ``rollout_summary``) and the command ids in the order of ``device_ids``.

        Raises:
            InvalidInput: no device, a bad or repeated device id, or any other bad input;
                nothing is written.
            QueueFull: a device would go over its limit; nothing is written.
        """
        if isinstance(device_ids, str | bytes):
            raise InvalidDeviceId("device_ids must be a collection of device ids, not one id")
        devices = [self._validate_device(device) for device in device_ids]
        if not devices:
            raise InvalidDeviceId("enqueue_many needs at least one device id")
        seen: set[str] = set()
        for device in devices:
            if device in seen:
                raise InvalidDeviceId(f"device id {device!r} is given more than once")
            seen.add(device)
        if requires_confirmation and command_type is None:
            raise InvalidInput("requires_confirmation needs a command_type")
        if command_type is not None:
            validate_command_type(command_type, self.limits)
        rollout_id = str(uuid.uuid4())
        first = self.build(
            devices[0],
            command_type,
            payload,
            ttl,
            requires_confirmation=requires_confirmation,
            outcome_timeout=outcome_timeout,
            rollout_id=rollout_id,
            by=by,
        )
        records = [first, *(rules.sibling(first, device) for device in devices[1:])]
        await self._accept_many(records)
        return Rollout(rollout_id, tuple(record.id for record in records))

    def build(
        self,
        device_id: object,
        command_type: object | None,
        payload: object,
        ttl: object,
        *,
        requires_confirmation: bool = False,
        outcome_timeout: object = None,
        rollout_id: str | None = None,
        by: object = None,
    ) -> CommandRecord:
        """Validates input and builds a new record; raises before anything is written.

        ``by`` names who enqueues it (``enqueued_by``): None or a short printable name.
        """
        return rules.new_command(
            device_id=self._validate_device(device_id),
            command_type=command_type,
            payload=payload,
            ttl=ttl,
            requires_confirmation=requires_confirmation,
            now=self.clock(),
            limits=self.limits,
            outcome_timeout=outcome_timeout,
            rollout_id=rollout_id,
            enqueued_by=by,
        )

    def _validate_device(self, device_id: object) -> str:
        """The device id if this store accepts it; every call naming a device checks it here.

        Raises:
            InvalidDeviceId: the id breaks ``limits`` (or what a subclass adds).
        """
        return validate_device_id(device_id, self.limits)

    @abc.abstractmethod
    async def _accept(self, record: CommandRecord) -> str:
        """Takes a validated record in; returns its id once it is accepted."""

    @abc.abstractmethod
    async def _accept_many(self, records: Sequence[CommandRecord]) -> None:
        """Takes validated records in, all or none, in one atomic write."""
