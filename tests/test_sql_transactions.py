"""Each write transaction is written once; every executor leaves the same rows behind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from amqp_queue.state import SqlStore
from amqp_queue.state.model import CommandRecord
from amqp_queue.state.sql import command_queue, create_engine
from amqp_queue.state.sql.statements import RECORD_COLUMNS, record_of
from tests.backends import POSTGRES_URL, postgres_schema
from tests.support import FakeClock

Executor = Callable[[Path, FakeClock], AbstractAsyncContextManager[SqlStore]]


@asynccontextmanager
async def sqlite_writer_thread(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqlStore]:
    async with await SqlStore.connect(
        f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", clock=clock
    ) as store:
        assert store._writer is not None
        yield store


@asynccontextmanager
async def sqlite_engine(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqlStore]:
    """A named schema turns the driver-level connections off: all through SQLAlchemy."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    try:
        async with SqlStore(engine, schema="main", clock=clock) as store:
            assert store._writer is None
            await store.create_table()
            yield store
    finally:
        await engine.dispose()


@asynccontextmanager
async def postgres(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqlStore]:
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema, clock=clock) as store,
    ):
        yield store


async def _rows(store: SqlStore) -> list[CommandRecord]:
    async with store.engine.connect() as conn:
        found = await conn.execute(sa.select(*RECORD_COLUMNS).order_by(command_queue.c.seq))
        return [_to_the_second(record_of(dict(row._mapping))) for row in found]


def _to_the_second(record: CommandRecord) -> CommandRecord:
    """A change and a write read their time once they hold their locks: the fake clock's
    now plus the microseconds since the call began (state.clock.Advancing), which differ
    from one run to the next."""
    values = {field.name: getattr(record, field.name) for field in fields(record)}
    times: dict[str, Any] = {
        name: value.replace(microsecond=0)
        for name, value in values.items()
        if isinstance(value, datetime)
    }
    return replace(record, **times)


async def _scenario(store: SqlStore, clock: FakeClock) -> list[Any]:
    """Every write transaction, records built alike (fixed ids) so the rows compare."""
    ids = iter(f"00000000-0000-4000-8000-{index:012d}" for index in range(100))

    def build(device: str, kind: str | None, ttl: float, **options: Any) -> CommandRecord:
        return replace(store.build(device, kind, b"x", ttl, **options), id=next(ids))

    outcomes: list[Any] = []
    soon_expired = build("dev-1", "mode", 1)
    older = build("dev-1", "setpoint", 60)
    outcomes.append(await store.add([soon_expired, older]))
    clock.advance(2)
    plain, first = build("dev-1", None, 60), build("dev-1", "setpoint", 60)
    second = build("dev-1", "setpoint", 60, requires_confirmation=True)
    batch = [plain, first, build("dev-2", "mode", 60), second, build("dev-1", "mode", 60)]
    outcomes.append(await store.write(batch, [plain.id]))
    outcomes.append((await store.confirm(second.id)).confirmed)
    handed = await store.hand_over(await store.claim("dev-1", [plain.id, second.id]))
    outcomes.append([(record.id, record.delivered) for record in handed])
    outcomes.append(await store.mark_delivered([older.id]))
    outcomes.append(await store.release(handed[:1], handed[1:]))
    outcomes.append(await store.reject([batch[2].id, older.id]))
    outcomes.append((await store.cancel(batch[4].id)).end_reason)
    clock.advance(120)
    outcomes.append(await store.cleanup())
    return [outcomes, await _rows(store)]


async def test_every_executor_writes_the_same_rows(tmp_path: Path) -> None:
    start = FakeClock().now
    results = []
    executors: list[Executor] = [sqlite_writer_thread, sqlite_engine, postgres]
    for index, executor in enumerate(executors):
        clock = FakeClock(start)
        directory = tmp_path / str(index)
        directory.mkdir()
        async with executor(directory, clock) as store:
            results.append(await _scenario(store, clock))

    assert results[0] == results[1]
    assert results[0] == results[2]
    outcomes = results[0][0]
    # One replaced in the DB (older), one in the batch (first); soon_expired ended EXPIRED.
    assert outcomes[1] == 2


@pytest.mark.parametrize("executor", [sqlite_writer_thread, sqlite_engine, postgres])
async def test_a_batch_of_one_slot_keeps_only_its_last_record_open(
    executor: Executor, tmp_path: Path
) -> None:
    clock = FakeClock()
    async with executor(tmp_path, clock) as store:
        records = [store.build("dev-1", "setpoint", bytes([n]), 60) for n in range(5)]
        assert await store.add(records) == 4
        clock.advance(1)
        assert [c.payload for c in await store.get_pending("dev-1")] == [bytes([4])]
        assert await store.drain_pending("dev-1") == [bytes([4])]
