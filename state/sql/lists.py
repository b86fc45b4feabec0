"""The fleet-wide lists of the SQL store: the confirmation inbox, the devices with open
commands and a device's history, each one index query (see the indexes in
:mod:`amqp_queue.state.sql.schema`) paged by keyset, never by offset, so a page costs the
same deep in a large table as at its start.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..clock import Clock
from ..model import CommandRecord, DeviceSummary, Position
from . import statements as sql
from .schema import AWAITS_CONFIRMATION, IS_OPEN, IS_READY, command_queue

if TYPE_CHECKING:
    from .transactions import Row

c = command_queue.c

_AT = sa.bindparam("at", type_=c.created_at.type)
_ID = sa.bindparam("id", type_=c.id.type)
_KEY = sa.tuple_(c.created_at, c.id)
_CURSOR = sa.tuple_(_AT, _ID)


@functools.cache
def _awaiting(after: bool, prefix: bool, kind: bool) -> sa.Select[Any]:
    # Repeats the partial index's predicate to the letter (SQLite needs it to use the index).
    query = sa.select(*sql.RECORD_COLUMNS).where(AWAITS_CONFIRMATION, c.expires_at > sql.NOW)
    if after:
        query = query.where(_KEY > _CURSOR)
    if prefix:
        # substr, not LIKE: LIKE is case-insensitive on SQLite and needs escaping.
        pattern = sa.bindparam("prefix", type_=sa.Text())
        query = query.where(sa.func.substr(c.device_id, 1, sa.func.length(pattern)) == pattern)
    if kind:
        query = query.where(c.command_type == sa.bindparam("kind"))
    return query.order_by(c.created_at, c.id).limit(sa.bindparam("limit"))


def awaiting_confirmation(
    now: datetime,
    after: Position | None,
    limit: int,
    device_prefix: str | None,
    command_type: str | None,
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The inbox query and its parameters."""
    params: dict[str, Any] = {"now": now, "limit": limit}
    if after is not None:
        params["at"], params["id"] = after
    if device_prefix is not None:
        params["prefix"] = device_prefix
    if command_type is not None:
        params["kind"] = command_type
    query = _awaiting(after is not None, device_prefix is not None, command_type is not None)
    return query, params


@functools.cache
def _devices(after: bool) -> sa.Select[Any]:
    waiting = sa.not_(IS_READY)
    query = sa.select(
        c.device_id,
        sa.func.count().label("open"),
        sa.func.sum(sa.case((waiting, 1), else_=0)).label("awaiting"),
    ).where(IS_OPEN, c.expires_at > sql.NOW)
    if after:
        query = query.where(c.device_id > sa.bindparam("after", type_=sa.Text()))
    return query.group_by(c.device_id).order_by(c.device_id).limit(sa.bindparam("limit"))


def devices_with_open(
    now: datetime, after: str | None, limit: int
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The devices query (read from ``ix_command_queue_device_open``) and its parameters."""
    params: dict[str, Any] = {"now": now, "limit": limit}
    if after is not None:
        params["after"] = after
    return _devices(after is not None), params


@functools.cache
def _history(before: bool) -> sa.Select[Any]:
    query = sa.select(*sql.RECORD_COLUMNS).where(c.device_id == sa.bindparam("device"))
    if before:
        query = query.where(_KEY < _CURSOR)
    return query.order_by(c.created_at.desc(), c.id.desc()).limit(sa.bindparam("limit"))


def device_history(
    device_id: str, before: Position | None, limit: int
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The history query (read from ``ix_command_queue_device_history``) and its parameters."""
    params: dict[str, Any] = {"device": device_id, "limit": limit}
    if before is not None:
        params["at"], params["id"] = before
    return _history(before is not None), params


class SqlLists:
    """The fleet-wide list calls of :class:`~amqp_queue.state.sql.store.SqlStore`."""

    clock: Clock

    if TYPE_CHECKING:  # provided by SqlStore

        async def _select(self, query: sa.Select[Any], **params: Any) -> list[Row]: ...

    async def awaiting_confirmation(
        self,
        *,
        after: Position | None = None,
        limit: int = 100,
        device_prefix: str | None = None,
        command_type: str | None = None,
    ) -> list[CommandRecord]:
        query, params = awaiting_confirmation(
            self.clock(), after, limit, device_prefix, command_type
        )
        return [sql.record_of(row) for row in await self._select(query, **params)]

    async def devices_with_open(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[DeviceSummary]:
        query, params = devices_with_open(self.clock(), after, limit)
        return [
            DeviceSummary(
                row["device_id"], int(row["open"]) - int(row["awaiting"]), int(row["awaiting"])
            )
            for row in await self._select(query, **params)
        ]

    async def device_history(
        self, device_id: str, *, before: Position | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        query, params = device_history(device_id, before, limit)
        return [sql.record_of(row) for row in await self._select(query, **params)]
