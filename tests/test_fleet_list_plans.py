"""The fleet-wide lists (the console's inbox, devices, a device's history) are index reads:
each query's plan uses the index migration 0005 (or the per-device index) adds, and sorts
nothing, so a page costs the same on a large table as on a small one. Plans, not timings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from amqp_queue.state import SqlStore
from amqp_queue.state.sql import fleet_statements as fleet_sql
from amqp_queue.state.sql import lists
from tests.backends import POSTGRES_URL, postgres_schema
from tests.plans import sqlite_plan

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CURSOR = (NOW, "00000000-0000-0000-0000-000000000001")

# Two partial indexes on open commands lead with device_id, so either reads the devices in
# order; PostgreSQL picks between them by their (nearly equal) sizes, so the test accepts both.
OPEN_BY_DEVICE = ("ix_command_queue_device_open", "uq_command_queue_dedup")

QUERIES: list[tuple[str, tuple[sa.Select[Any], dict[str, Any]], str | tuple[str, ...]]] = [
    (
        "inbox",
        lists.awaiting_confirmation(NOW, None, 50, None, None),
        "ix_command_queue_awaiting_confirmation",
    ),
    (
        "inbox, next page, filtered",
        lists.awaiting_confirmation(NOW, CURSOR, 50, "gw-", "unlock"),
        "ix_command_queue_awaiting_confirmation",
    ),
    ("devices", lists.devices_with_open(NOW, None, 50), OPEN_BY_DEVICE),
    ("devices, next page", lists.devices_with_open(NOW, "gw-1", 50), OPEN_BY_DEVICE),
    ("history", lists.device_history("gw-1", None, 50), "ix_command_queue_device_history"),
    (
        "history, next page",
        lists.device_history("gw-1", CURSOR, 50),
        "ix_command_queue_device_history",
    ),
]


@pytest.mark.parametrize(("what", "query", "index"), QUERIES, ids=[q[0] for q in QUERIES])
async def test_each_list_reads_its_index_in_order_on_sqlite(
    tmp_path: Path,
    what: str,
    query: tuple[sa.Select[Any], dict[str, Any]],
    index: str | tuple[str, ...],
) -> None:
    statement, _ = query
    async with await SqlStore.connect(f"sqlite+aiosqlite:///{tmp_path / 'plans.db'}") as store:
        details = await sqlite_plan(store, statement)

    assert any(name in details for name in _names(index)), (what, details)
    assert "TEMP B-TREE" not in details, (what, details)


def _names(index: str | tuple[str, ...]) -> tuple[str, ...]:
    return (index,) if isinstance(index, str) else index


def _literal(value: object) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'"
    assert isinstance(value, str)
    assert "'" not in value
    return f"'{value}'"


@pytest.mark.parametrize(("what", "query", "index"), QUERIES, ids=[q[0] for q in QUERIES])
async def test_each_list_can_use_its_index_without_sorting_on_postgres(
    what: str, query: tuple[sa.Select[Any], dict[str, Any]], index: str | tuple[str, ...]
) -> None:
    statement, params = query
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema) as store,
    ):
        await store.enqueue_with_confirmation("gw-1", "unlock", b"x", 60)
        # Compiled for asyncpg: $1, $2, ... in the order of positiontup, prepared and
        # explained with the values (a tiny table: the planner is told to avoid seq scans).
        compiled = statement.compile(store.engine)
        bound = compiled.construct_params(params)
        values = ", ".join(_literal(bound[name]) for name in compiled.positiontup or [])
        async with store.engine.connect() as conn:
            await conn.exec_driver_sql(f'SET search_path TO "{schema}"')
            await conn.exec_driver_sql("SET enable_seqscan = off")
            await conn.exec_driver_sql(f"PREPARE listing AS {compiled}")
            plan = (await conn.exec_driver_sql(f"EXPLAIN EXECUTE listing({values})")).all()

    details = " ".join(str(row[0]) for row in plan)
    assert any(name in details for name in _names(index)), (what, details)
    assert "Sort Key" not in details, (what, details)


async def test_a_rollout_summary_counts_from_its_index_without_sorting_on_sqlite(
    tmp_path: Path,
) -> None:
    # Grouping 100,000 rows by a computed status sorted them in a temporary B-tree (60 ms
    # against the 50 ms target); grouped by the index's own columns, and with what the
    # status is computed from in the index, the summary reads the index and nothing else.
    async with await SqlStore.connect(f"sqlite+aiosqlite:///{tmp_path / 'plans.db'}") as store:
        details = await sqlite_plan(store, fleet_sql.ROLLOUT_COUNTS)

    assert "COVERING INDEX ix_command_queue_rollout" in details, details
    assert "TEMP B-TREE" not in details, details
