"""consume()'s reads on PostgreSQL run on asyncpg directly (state/sql/postgres_reads.py): they
must answer exactly what the SQLAlchemy path answers, in the store's schema, and fail as a
StateError."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from amqp_queue.state import SqlStore, StateError
from amqp_queue.state.sql import statements as sql
from amqp_queue.state.sql.engine import create_engine
from tests.backends import POSTGRES_URL, postgres_schema

START = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


async def test_hot_reads_answer_as_the_sqlalchemy_path_in_the_stores_schema() -> None:
    clock = Clock()
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema, clock=clock) as store,
    ):
        ready = await store.enqueue("gw-1", b"a", 60, outcome_timeout=30)
        waiting = await store.enqueue_with_confirmation("gw-1", "unlock", b"b", 60)
        cancelled = await store.enqueue("gw-1", b"c", 60)
        await store.cancel_command(cancelled)
        delivered = await store.enqueue("gw-2", b"d", 60)
        await store.drain_pending("gw-2")
        short = await store.enqueue("gw-1", b"e", 5)
        clock.now += timedelta(seconds=10)
        ids = [ready, waiting, cancelled, delivered, short, "00000000-0000-4000-8000-000000000000"]

        live = {command_id: await store.is_deliverable(command_id) for command_id in ids}
        assert live == {command_id: command_id == ready for command_id in ids}
        records = await store.deliverable(ids)
        assert list(records) == [ready]
        assert records[ready].outcome_timeout == 30.0  # a double precision column, read back
        # The SQLAlchemy path, as every other statement runs: the same record.
        rows = await store._select(sql.DELIVERABLE, ids=ids, now=clock.now)
        assert [sql.record_of(row) for row in rows] == [records[ready]]


async def test_a_failed_hot_read_is_a_state_error() -> None:
    engine = create_engine(POSTGRES_URL.rsplit("/", 1)[0] + "/no_such_database_here")
    store = SqlStore(engine)
    try:
        with pytest.raises(StateError, match="no_such_database_here"):
            await store.is_deliverable("00000000-0000-4000-8000-000000000000")
        with pytest.raises(StateError, match="no_such_database_here"):
            await store.deliverable(["00000000-0000-4000-8000-000000000000"])
    finally:
        await engine.dispose()
