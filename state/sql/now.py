"""The time statements compare with: the store clock's now, a bind parameter of each."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

from .schema import command_queue

NOW = sa.bindparam("now", type_=command_queue.c.ended_at.type)
"""The store clock's now, the one time every statement compares with."""


class NowAfterLocks(sa.sql.expression.ColumnElement[Any]):
    """:data:`NOW`, on PostgreSQL plus the time its transaction has run so far: a hand-over
    that waited for a row lock (another writer's, up to a deadlock timeout), here or in an
    earlier statement of its transaction (a drain's claim), compares expiry with the time it
    got the lock, not the time ``now`` was read, so a command that expired meanwhile is not
    handed out. A row another transaction only locked, never changed, is not checked again
    once its lock is granted: a hand-over of its own takes its rows' locks first
    (:data:`~amqp_queue.state.sql.statements.LOCK`). (A claim need not: every claim is handed
    over before its commands go out.) SQLite takes its lock at a transaction's BEGIN, and a
    drain reads its :class:`~amqp_queue.state.clock.Advancing` now after it."""

    type = command_queue.c.ended_at.type
    inherit_cache = True
    time: sa.BindParameter[Any] = NOW


DECIDED = sa.bindparam("decided", type_=command_queue.c.ended_at.type)
"""A set-wide write's now read once its transaction began (SQLite holds the file's write
lock then), where :data:`NOW` is the call's own time, which it stores and recognises its
writes by when it runs again after a lost COMMIT answer."""


class DecidedAfterLocks(NowAfterLocks):
    """:class:`NowAfterLocks` of :data:`DECIDED`: a rollout's or device's cancel or confirm
    that waited for another writer past its members' TTL leaves them expired."""

    inherit_cache = True
    time = DECIDED


@compiles(NowAfterLocks)
def _now_after_locks(element: NowAfterLocks, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.time, **kw))


@compiles(NowAfterLocks, "postgresql")
def _now_after_locks_pg(element: NowAfterLocks, compiler: Any, **kw: Any) -> str:
    now = compiler.process(element.time, **kw)
    return f"({now} + (clock_timestamp() - transaction_timestamp()))"


When = datetime | Callable[[], datetime]
"""A transaction's now: a time, or one read when the transaction runs (once it holds its
lock: a SQLite drain waits for the file's write lock up to the busy timeout, a transaction
run again after a deadlock waited for one): see :class:`~amqp_queue.state.clock.Advancing`."""


def read(when: When) -> datetime:
    return when() if callable(when) else when
