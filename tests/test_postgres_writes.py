"""Write transactions on PostgreSQL run on asyncpg directly (state/sql/postgres_writes.py): they
must write exactly what the same transactions write through SQLAlchemy, refuse alike (nothing
written), fail as a StateError, and keep their connection after a refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from amqp_queue.state import (
    CommandNotFound,
    CommandStatus,
    QueueFull,
    SqlStore,
    StateError,
)
from amqp_queue.state.sql.engine import create_engine
from amqp_queue.state.validation import DEFAULT_LIMITS
from tests.backends import POSTGRES_URL, postgres_schema

START = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = replace(DEFAULT_LIMITS, max_pending_per_device=4)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@asynccontextmanager
async def store_on(*, direct: bool, clock: Clock) -> AsyncIterator[SqlStore]:
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema, clock=clock, limits=LIMITS) as store,
    ):
        if not direct:
            # The SQLAlchemy path, as on a PostgreSQL driver other than asyncpg.
            assert store._pg_writes is not None
            await store._pg_writes.close()
            store._pg_writes = None
        yield store


async def workload(store: SqlStore, clock: Clock) -> list[object]:
    """Every kind of write transaction once; what each answered and the statuses after."""
    seen: list[object] = []
    plain = await store.enqueue("gw-1", b"a", 60, outcome_timeout=30)
    first = await store.enqueue_or_update("gw-1", "setpoint", b"b", 60)
    second = await store.enqueue_or_update("gw-1", "setpoint", b"c", 60)
    waiting = await store.enqueue_with_confirmation("gw-2", "unlock", b"d", 60)
    seen.append((await store.confirm_changed(waiting, by="ops"))[1])
    doomed = await store.enqueue("gw-2", b"e", 60)
    seen.append((await store.cancel(doomed, by="ops")).end_reason)
    with pytest.raises(CommandNotFound):
        await store.cancel(doomed)
    short = await store.enqueue("gw-3", b"f", 5)
    for payload in (b"g", b"h", b"i"):
        await store.enqueue("gw-3", payload, 60)
    with pytest.raises(QueueFull):
        await store.enqueue("gw-3", b"over", 60)
    seen.append(await store.drain_pending("gw-1"))
    given_back = await store.get(plain)
    assert given_back is not None
    seen.append(await store.release([given_back], []))
    await store.mark_published([waiting])
    clock.now += timedelta(seconds=10)
    seen.append(await store.cleanup())
    seen.append(sorted(await store.drain_pending("gw-3")))
    ids = [plain, first, second, waiting, doomed, short]
    seen.append([await store.get_status(command_id) for command_id in ids])
    seen.append(
        [(command.payload, command.confirmed) for command in await store.get_pending("gw-2")]
    )
    return seen


async def test_write_transactions_on_the_driver_write_as_the_sqlalchemy_path() -> None:
    answers = []
    for direct in (True, False):
        clock = Clock()
        async with store_on(direct=direct, clock=clock) as store:
            answers.append(await workload(store, clock))

    assert answers[0] == answers[1]
    assert answers[0][-2] == [
        CommandStatus.PENDING,  # drained, then given back
        CommandStatus.SUPERSEDED,
        CommandStatus.DELIVERED,
        CommandStatus.PENDING,
        CommandStatus.CANCELLED,
        CommandStatus.EXPIRED,
    ]


async def test_a_refused_write_keeps_the_kept_connection_and_writes_nothing() -> None:
    clock = Clock()
    async with store_on(direct=True, clock=clock) as store:
        for payload in (b"a", b"b", b"c", b"d"):
            await store.enqueue("gw-1", payload, 60)
        pool = store.engine.sync_engine.pool
        before = pool.checkedout()  # type: ignore[attr-defined]  # (QueuePool)

        with pytest.raises(QueueFull):
            await store.enqueue("gw-1", b"over", 60)

        assert pool.checkedout() == before  # type: ignore[attr-defined]
        assert [command.payload for command in await store.get_pending("gw-1")] == [
            b"a",
            b"b",
            b"c",
            b"d",
        ]


async def test_a_failed_write_on_the_driver_is_a_state_error() -> None:
    engine = create_engine(POSTGRES_URL.rsplit("/", 1)[0] + "/no_such_database_here")
    store = SqlStore(engine)
    try:
        with pytest.raises(StateError, match="no_such_database_here"):
            await store.enqueue("gw-1", b"a", 60)
    finally:
        await engine.dispose()


async def test_a_write_the_driver_breaks_off_is_a_state_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # asyncpg raises InternalClientError, no InterfaceError, when the server goes in the middle
    # of an operation (seen with `pg_ctl stop -m fast` under load): still the index failing.
    async def broken(*args: object, **kwargs: object) -> None:
        raise asyncpg.InternalClientError("connection was closed in the middle of operation")

    async with store_on(direct=True, clock=Clock()) as store:
        await store.enqueue("gw-1", b"a", 60)
        monkeypatch.setattr(asyncpg.Connection, "executemany", broken)

        with pytest.raises(StateError, match="in the middle of operation"):
            await store.enqueue("gw-1", b"b", 60)

        monkeypatch.undo()
        await store.enqueue("gw-1", b"c", 60)
        assert [command.payload for command in await store.get_pending("gw-1")] == [b"a", b"c"]
