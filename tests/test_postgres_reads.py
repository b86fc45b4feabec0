"""consume()'s reads and delivery marks on PostgreSQL run on asyncpg directly
(state/sql/postgres_reads.py), on pooled connections kept checked out: they must answer exactly
what the SQLAlchemy path answers, in the store's schema, fail as a StateError, run a deadlock
victim again, and hand their connections back when the store closes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from amqp_queue.state import CommandStatus, SqlStore, StateError
from amqp_queue.state.sql import deadlock_retry, transactions
from amqp_queue.state.sql import statements as sql
from amqp_queue.state.sql.engine import create_engine
from tests.backends import POSTGRES_URL, postgres_schema
from tests.tcp_proxy import TCPProxy

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
        # One command by id (status reads, a confirm's lookup), whatever its status: there.
        reads = store._pg_reads
        assert reads is not None
        direct, read_there = reads.one, list[str]()

        async def one_there(command_id: str) -> Any:
            read_there.append(command_id)
            return await direct(command_id)

        reads.one = one_there  # type: ignore[method-assign]
        for command_id in ids:
            one = await store._select(sql.ONE, command_id=command_id)
            assert await store.get(command_id) == (sql.record_of(one[0]) if one else None)
        assert read_there == ids
        # A device's open commands (get_pending, the operators' list), in write order: there.
        listed = list[str]()
        open_direct = reads.open_commands

        async def open_there(device_id: str, now: datetime) -> Any:
            listed.append(device_id)
            return await open_direct(device_id, now)

        reads.open_commands = open_there  # type: ignore[method-assign]
        for device in ("gw-1", "gw-2", "gw-3"):
            rows = await store._select(sql.OPEN_COMMANDS, device=device, now=clock.now)
            assert await store.open_commands(device) == [sql.record_of(row) for row in rows]
        assert [command.id for command in await store.get_pending("gw-1")] == [ready, waiting]
        assert listed == ["gw-1", "gw-2", "gw-3", "gw-1"]


async def test_a_failed_hot_read_is_a_state_error() -> None:
    engine = create_engine(POSTGRES_URL.rsplit("/", 1)[0] + "/no_such_database_here")
    store = SqlStore(engine)
    try:
        with pytest.raises(StateError, match="no_such_database_here"):
            await store.is_deliverable("00000000-0000-4000-8000-000000000000")
        with pytest.raises(StateError, match="no_such_database_here"):
            await store.deliverable(["00000000-0000-4000-8000-000000000000"])
        with pytest.raises(StateError, match="no_such_database_here"):
            await store.get("00000000-0000-4000-8000-000000000000")
    finally:
        await engine.dispose()


async def test_delivery_marks_on_the_driver_mark_as_the_sqlalchemy_path() -> None:
    clock = Clock()
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema, clock=clock) as store,
    ):

        async def commands() -> list[str]:
            ready = await store.enqueue("gw-1", b"a", 60)
            cancelled = await store.enqueue("gw-1", b"b", 60)
            await store.cancel_command(cancelled)
            delivered = await store.enqueue("gw-2", b"c", 60)
            await store.drain_pending("gw-2")
            return [ready, cancelled, delivered, "00000000-0000-4000-8000-000000000000"]

        direct, through_sqlalchemy = await commands(), await commands()
        marked = await store.mark_delivered(direct)
        async with store.engine.begin() as conn:
            expected = await transactions.run(
                conn, transactions.mark_delivered(through_sqlalchemy, clock.now)
            )
        assert marked == expected == 2  # the open one, and the one a device took anyway
        assert [await store.get_status(command_id) for command_id in direct[:3]] == [
            await store.get_status(command_id) for command_id in through_sqlalchemy[:3]
        ]


async def test_the_kept_connections_answer_concurrent_calls_and_go_back_on_close() -> None:
    async with postgres_schema() as schema:
        store = await SqlStore.connect(POSTGRES_URL, schema=schema)
        pool = store.engine.sync_engine.pool
        try:
            ids = [await store.enqueue("gw-1", b"a", 60) for _ in range(6)]
            # More calls than kept connections at once: the busy ones take pooled ones.
            reads = await asyncio.gather(*(store.is_deliverable(i) for i in ids))
            marks = await asyncio.gather(
                store.mark_delivered(ids[:3]), store.mark_delivered(ids[3:4])
            )
            assert reads == [True] * 6
            assert list(marks) == [3, 1]
            assert [await store.is_deliverable(command_id) for command_id in ids] == [
                False,
                False,
                False,
                False,
                True,
                True,
            ]
            # Kept: the liveness reads', the delivery marks' and the write transactions'.
            assert pool.checkedout() == 3  # type: ignore[attr-defined]  # (QueuePool)
        finally:
            await store.close()
        assert pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_delivery_mark_chosen_as_deadlock_victim_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema) as store,
    ):
        command_id = await store.enqueue("gw-1", b"a", 60)
        direct = store._pg_reads
        assert direct is not None
        mark = direct.mark_delivered
        calls = 0

        async def first_a_victim(command_ids: Sequence[str], now: datetime) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise asyncpg.DeadlockDetectedError("deadlock detected")
            return await mark(command_ids, now)

        monkeypatch.setattr(direct, "mark_delivered", first_a_victim)
        assert await store.mark_delivered([command_id]) == 1
        assert calls == 2
        assert await store.get_status(command_id) is CommandStatus.DELIVERED

        async def refused(command_ids: Sequence[str], now: datetime) -> int:
            raise asyncpg.UniqueViolationError("not one to run again")

        monkeypatch.setattr(direct, "mark_delivered", refused)
        with pytest.raises(StateError, match="delivery mark failed: not one to run again"):
            await store.mark_delivered([command_id])


async def test_asyncpgs_own_deadlock_errors_count_as_transient() -> None:
    connection = await asyncpg.connect(POSTGRES_URL.replace("+asyncpg", ""))
    try:
        for sqlstate, retried in (("40P01", True), ("40001", True), ("23505", False)):
            with pytest.raises(asyncpg.PostgresError) as caught:
                await connection.execute(
                    f"DO $$ BEGIN RAISE EXCEPTION 'made here' USING ERRCODE = '{sqlstate}'; END $$"
                )
            assert deadlock_retry.is_transient(caught.value) is retried, sqlstate
    finally:
        await connection.close()


async def test_calls_after_the_index_link_died_idle_answer_at_once() -> None:
    """PostgreSQL restarted, or every link to it cut, while the store's connections sat idle
    (pooled, or kept for the hot reads, the marks and the writes): once it answers again, a
    call answers. The dead connection is the pool's to replace, not the caller's failure."""
    async with (
        postgres_schema() as schema,
        TCPProxy(make_url(POSTGRES_URL).port or 5432, max_connections=50) as proxy,
    ):
        through = make_url(POSTGRES_URL).set(port=proxy.port).render_as_string(False)
        async with await SqlStore.connect(through, schema=schema) as store:
            first, second = [await store.enqueue("gw-1", b"a", 60) for _ in range(2)]
            # Every kind of call once: the connections they use stay open between calls.
            assert await store.get_status(first) is CommandStatus.PENDING
            assert await store.is_deliverable(first)
            assert list(await store.deliverable([first])) == [first]
            assert await store.mark_delivered([second]) == 1
            assert len(await store.get_pending("gw-1")) == 1

            await proxy.cut()
            await proxy.restore()

            # At once from many callers: most find the kept connection busy and take pooled
            # ones, dead too.
            lives = await asyncio.gather(*(store.is_deliverable(first) for _ in range(40)))
            statuses = await asyncio.gather(*(store.get_status(first) for _ in range(20)))
            assert all(lives)
            assert set(statuses) == {CommandStatus.PENDING}
            assert await store.get_status(first) is CommandStatus.PENDING
            assert await store.is_deliverable(first)
            assert list(await store.deliverable([first])) == [first]
            assert len(await store.get_pending("gw-1")) == 1
            assert [record.id for record in await store.open_commands("gw-1")] == [first]
            third = await store.enqueue("gw-1", b"c", 60)
            await store.cancel_command(third)
            assert await store.mark_delivered([first]) == 1
            assert await store.get_status(first) is CommandStatus.DELIVERED
