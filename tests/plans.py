"""Query plans, for tests that a read uses its index instead of scanning or sorting."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from amqp_queue.state import SqlStore


async def sqlite_plan(store: SqlStore, statement: sa.Select[Any]) -> str:
    """SQLite's ``EXPLAIN QUERY PLAN`` of ``statement`` on ``store``, its details joined.

    The plan does not depend on the values: SQLite plans before it binds them.
    """
    compiled = statement.compile(store.engine)
    placeholders = tuple(None for _ in compiled.positiontup or [])
    async with store.engine.connect() as conn:
        plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", placeholders)).all()
    return " ".join(str(row[-1]) for row in plan)
