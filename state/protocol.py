"""The command-store contract every backend implements (docs/design.md, "The contract")."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from .model import CommandStatus, PendingCommand
from .validation import Ttl


@runtime_checkable
class Store(Protocol):
    """An offline command queue for devices.

    Every enqueue returns the new command's id (a UUID string). ``ttl`` is seconds or a
    ``timedelta``.
    """

    async def enqueue(self, device_id: str, payload: bytes, ttl: Ttl) -> str:
        """Queues a command that is ready at once."""
        ...

    async def enqueue_or_update(
        self, device_id: str, command_type: str, payload: bytes, ttl: Ttl
    ) -> str:
        """Queues a command that replaces the undelivered one of the same type (latest wins)."""
        ...

    async def enqueue_with_confirmation(
        self, device_id: str, command_type: str, payload: bytes, ttl: Ttl
    ) -> str:
        """Queues a command that is delivered only after ``confirm_command``; replaces by type."""
        ...

    async def get_pending(self, device_id: str) -> list[PendingCommand]:
        """Every unexpired, undelivered command of the device, oldest write first."""
        ...

    async def drain_pending(self, device_id: str) -> list[bytes]:
        """Payloads of every ready command in readiness order, marked delivered."""
        ...

    async def get_pending_confirmations(self, device_id: str) -> list[PendingCommand]:
        """Unexpired commands still waiting for confirmation, oldest write first."""
        ...

    async def confirm_command(self, command_id: str) -> None:
        """Approves a command for delivery."""
        ...

    async def cancel_command(self, command_id: str) -> None:
        """Cancels an undelivered command."""
        ...

    async def cleanup(self) -> int:
        """Removes expired commands and returns how many; prunes old finished ones."""
        ...

    async def get_status(self, command_id: str) -> CommandStatus:
        """The command's status."""
        ...

    async def close(self) -> None:
        """Releases connections the store owns."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
