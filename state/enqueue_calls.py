"""The three enqueue calls of the contract, written once for every store.

Each store differs only in how it accepts a validated record (:meth:`CommandIntake._accept`):
an index backend writes it, RabbitMQStore writes it and then publishes it when it is ready.
"""

from __future__ import annotations

import abc

from . import rules
from .clock import Clock
from .model import CommandRecord
from .validation import Limits, Ttl, validate_command_type, validate_device_id


class CommandIntake(abc.ABC):
    """``enqueue``, ``enqueue_or_update`` and ``enqueue_with_confirmation`` over ``_accept``.

    A subclass sets ``limits`` and ``clock`` and implements :meth:`_accept`; it may
    tighten :meth:`_validate_device` (RabbitMQStore: the device's queue name must fit).
    """

    limits: Limits
    clock: Clock

    async def enqueue(self, device_id: str, payload: bytes, ttl: Ttl) -> str:
        return await self._accept(self.build(device_id, None, payload, ttl))

    async def enqueue_or_update(
        self, device_id: str, command_type: str, payload: bytes, ttl: Ttl
    ) -> str:
        validate_command_type(command_type, self.limits)
        return await self._accept(self.build(device_id, command_type, payload, ttl))

    async def enqueue_with_confirmation(
        self, device_id: str, command_type: str, payload: bytes, ttl: Ttl
    ) -> str:
        validate_command_type(command_type, self.limits)
        return await self._accept(
            self.build(device_id, command_type, payload, ttl, requires_confirmation=True)
        )

    def build(
        self,
        device_id: object,
        command_type: object | None,
        payload: object,
        ttl: object,
        *,
        requires_confirmation: bool = False,
    ) -> CommandRecord:
        """Validates input and builds a new record; raises before anything is written."""
        return rules.new_command(
            device_id=self._validate_device(device_id),
            command_type=command_type,
            payload=payload,
            ttl=ttl,
            requires_confirmation=requires_confirmation,
            now=self.clock(),
            limits=self.limits,
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
