"""The SQL store's set-wide writes of rollouts and retiring (confirm a rollout, cancel a
rollout's or a device's open commands), each one transaction of
:mod:`amqp_queue.state.sql.transactions`; ``by`` names who does it.

Each is run again after a COMMIT whose answer was lost (``SqlExecution._rerunnable``): the
rerun changes what the lost one did not, and answers for both (the commands confirmed or
cancelled at the call's ``now`` by its ``by``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from ..model import CommandRecord
from . import transactions

if TYPE_CHECKING:
    from .transactions import Transaction

T = TypeVar("T")


class SqlFleetWrites:
    """Mixin of :class:`~amqp_queue.state.sql.store.SqlStore`, which runs the transactions."""

    if TYPE_CHECKING:  # provided by SqlStore

        async def _rerunnable(
            self, transaction: Callable[[], Transaction[T]], again: Callable[[], Transaction[T]]
        ) -> T: ...

    async def _confirm_rollout(
        self, rollout_id: str, now: datetime, by: str | None = None
    ) -> list[CommandRecord]:
        return await self._rerunnable(
            functools.partial(transactions.confirm_rollout, rollout_id, now, by),
            functools.partial(transactions.confirm_rollout_again, rollout_id, now, by),
        )

    async def _cancel_open(
        self,
        now: datetime,
        *,
        device_id: str | None = None,
        rollout_id: str | None = None,
        by: str | None = None,
    ) -> int:
        return await self._rerunnable(
            functools.partial(transactions.cancel_open, now, device_id, rollout_id, by),
            functools.partial(transactions.cancel_open_again, now, device_id, rollout_id, by),
        )
