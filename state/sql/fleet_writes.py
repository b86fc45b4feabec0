"""The SQL store's set-wide writes of rollouts and retiring (confirm a rollout, cancel a
rollout's or a device's open commands), each one transaction of
:mod:`amqp_queue.state.sql.transactions`; ``by`` names who does it.

Each is run again after a COMMIT whose answer was lost (``SqlExecution._rerunnable``): the
rerun changes what the lost one did not, and answers for both (the commands confirmed or
cancelled at the call's ``now`` by its ``by``). Each decides expiry with the time it runs
(read once its transaction began, and on PostgreSQL advanced while it waits for row locks:
:class:`~.now.DecidedAfterLocks`), not the call's ``now``, which it stores. The
transactions are written here, as the generators :mod:`amqp_queue.state.sql.transactions`
describes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from ..clock import Clock, advancing
from ..model import CommandRecord
from . import fleet_statements as fleet_sql
from . import statements as sql
from .now import read
from .transactions import Transaction, count, fetch

T = TypeVar("T")


class SqlFleetWrites:
    """Mixin of :class:`~amqp_queue.state.sql.store.SqlStore`, which runs the transactions."""

    clock: Clock

    if TYPE_CHECKING:  # provided by SqlStore

        async def _rerunnable(
            self, transaction: Callable[[], Transaction[T]], again: Callable[[], Transaction[T]]
        ) -> T: ...

    async def _confirm_rollout(
        self, rollout_id: str, now: datetime, by: str | None = None
    ) -> list[CommandRecord]:
        decided = advancing(self.clock, now)
        return await self._rerunnable(
            functools.partial(confirm_rollout, rollout_id, now, by, decided),
            functools.partial(confirm_rollout_again, rollout_id, now, by, decided),
        )

    async def _cancel_open(
        self,
        now: datetime,
        *,
        device_id: str | None = None,
        rollout_id: str | None = None,
        by: str | None = None,
    ) -> int:
        decided = advancing(self.clock, now)
        return await self._rerunnable(
            functools.partial(cancel_open, now, device_id, rollout_id, by, decided),
            functools.partial(cancel_open_again, now, device_id, rollout_id, by, decided),
        )


def confirm_rollout(
    rollout_id: str, now: datetime, by: str | None, decided: Clock
) -> Transaction[list[CommandRecord]]:
    # Read once the transaction began (a generator runs from its first statement on).
    params = {"rollout": rollout_id, "now": now, "by": by, "decided": read(decided)}
    yield from fetch(fleet_sql.LOCK_ROLLOUT, params)
    rows = yield from fetch(fleet_sql.CONFIRM_ROLLOUT, params)
    return [sql.record_of(row) for row in sorted(rows, key=lambda row: int(row["seq"]))]


def confirm_rollout_again(
    rollout_id: str, now: datetime, by: str | None, decided: Clock
) -> Transaction[list[CommandRecord]]:
    """:func:`confirm_rollout` run again after a COMMIT whose answer was lost: what it
    confirms now and what the lost run confirmed (at the same ``now``, by the same ``by``)."""
    yield from confirm_rollout(rollout_id, now, by, decided)
    params = {"rollout": rollout_id, "now": now, "by": by}
    rows = yield from fetch(fleet_sql.CONFIRMED_BY_CALL, params)
    return [sql.record_of(row) for row in sorted(rows, key=lambda row: int(row["seq"]))]


def cancel_open(
    now: datetime, device_id: str | None, rollout_id: str | None, by: str | None, decided: Clock
) -> Transaction[int]:
    params = {"now": now, "by": by, "decided": read(decided)}
    if device_id is not None:
        params["device"] = device_id
        yield from fetch(fleet_sql.LOCK_DEVICE, params)
        return (yield from count(fleet_sql.CANCEL_DEVICE, params))
    params["rollout"] = rollout_id
    yield from fetch(fleet_sql.LOCK_ROLLOUT, params)
    return (yield from count(fleet_sql.CANCEL_ROLLOUT, params))


def cancel_open_again(
    now: datetime, device_id: str | None, rollout_id: str | None, by: str | None, decided: Clock
) -> Transaction[int]:
    """:func:`cancel_open` run again after a COMMIT whose answer was lost: how many it
    cancels now and the lost run cancelled (at the same ``now``, by the same ``by``)."""
    yield from cancel_open(now, device_id, rollout_id, by, decided)
    params = {"device": device_id, "rollout": rollout_id, "now": now, "by": by}
    own = (
        fleet_sql.DEVICE_CANCELLED_BY_CALL
        if device_id is not None
        else fleet_sql.ROLLOUT_CANCELLED_BY_CALL
    )
    rows = yield from fetch(own, params)
    return int(next(iter(rows[0].values())))
