"""SqlStore beyond the contract: restarts, the schema's guarantees, and index use."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from amqp_queue.state import CommandStatus, SqlStore, StateError
from amqp_queue.state.sql import command_queue, create_engine, statements
from amqp_queue.state.sql.sqlite_reads import FEW, SqliteLiveCheck
from amqp_queue.state.sql.statements import UNPUBLISHED
from tests.backends import POSTGRES_URL, postgres_schema
from tests.plans import sqlite_plan
from tests.support import FakeClock


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'commands.db'}"


async def test_a_reopened_sqlite_file_holds_everything(tmp_path: Path, clock: FakeClock) -> None:
    url = sqlite_url(tmp_path)
    async with await SqlStore.connect(url, clock=clock) as before:
        plain = await before.enqueue("dev-1", b"plain", 60)
        old = await before.enqueue_or_update("dev-1", "setpoint", b"20", 60)
        waiting = await before.enqueue_with_confirmation("dev-1", "unlock", b"door", 60)

    async with await SqlStore.connect(url, clock=clock) as after:
        assert [c.id for c in await after.get_pending("dev-1")] == [plain, old, waiting]
        assert [c.id for c in await after.get_pending_confirmations("dev-1")] == [waiting]
        clock.advance(1)
        new = await after.enqueue_or_update("dev-1", "setpoint", b"21", 60)
        clock.advance(1)
        await after.confirm_command(waiting)

        assert await after.get_status(old) == CommandStatus.SUPERSEDED
        assert await after.drain_pending("dev-1") == [b"plain", b"21", b"door"]
        assert await after.get_status(new) == CommandStatus.DELIVERED


async def test_the_partial_unique_index_refuses_a_second_live_command_of_a_type(
    tmp_path: Path,
) -> None:
    async with await SqlStore.connect(sqlite_url(tmp_path)) as store:
        await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
        [live] = await store.get_pending("dev-1")
        duplicate = {
            "id": str(uuid.uuid4()),
            "device_id": "dev-1",
            "command_type": "setpoint",
            "payload": b"21",
            "expires_at": live.expires_at,
            "created_at": live.created_at,
        }
        with pytest.raises(IntegrityError):
            async with store.engine.begin() as conn:
                await conn.execute(sa.insert(command_queue).values(duplicate))


async def test_store_on_a_caller_owned_engine_leaves_it_open(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path))
    store = SqlStore(engine)
    await store.create_table()
    async with store:
        await store.enqueue("dev-1", b"x", 60)

    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(command_queue)) == 1
    await engine.dispose()


async def test_a_callers_sqlite_engine_keeps_its_transactions_and_journal_mode(
    tmp_path: Path,
) -> None:
    """The store takes SQLite's write lock in its own transactions only: on the caller's
    engine an application's transaction that only reads leaves other writers free, its
    connections keep the driver's isolation level, and the file its journal mode."""
    path = tmp_path / "app.db"
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with SqlStore(engine) as store:
            await store.create_table()
            waiting = await store.enqueue_with_confirmation("dev-1", "unlock", b"door", 60)
            await store.enqueue("dev-1", b"x", 60)
            await store.confirm_command(waiting)
            assert await store.drain_pending("dev-1") == [b"x", b"door"]

        async with engine.begin() as app:
            assert await app.scalar(sa.select(sa.func.count()).select_from(command_queue)) == 2
            driver = (await app.get_raw_connection()).driver_connection
            assert driver is not None
            isolation = driver.isolation_level
            other = sqlite3.connect(path, isolation_level=None, timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")  # "database is locked" under a BEGIN IMMEDIATE
                other.execute("ROLLBACK")
                journal_mode = other.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                other.close()
    finally:
        await engine.dispose()
    assert isolation == ""  # sqlite3's default: its own deferred BEGIN before a write
    assert journal_mode == "delete"


async def test_stores_on_a_callers_sqlite_engine_cancel_a_command_once(tmp_path: Path) -> None:
    """Cancel reads the row, then ends it; its transaction holds the write lock from the
    start also on a caller's engine, so of two concurrent cancels exactly one succeeds."""
    engine = create_async_engine(sqlite_url(tmp_path))
    try:
        # A schema turns off the hot paths' own connections: every write goes through
        # SQLAlchemy on the caller's engine. Two stores: each orders only its own writers.
        first, second = SqlStore(engine, schema="main"), SqlStore(engine, schema="main")
        await first.create_table()
        ids = [await first.enqueue("dev-1", b"x", 60) for _ in range(20)]
        outcomes = await asyncio.gather(
            *(store.cancel_command(each) for each in ids for store in (first, second)),
            return_exceptions=True,
        )
    finally:
        await engine.dispose()
    pairs = [outcomes[index : index + 2] for index in range(0, len(outcomes), 2)]
    assert all(
        sorted(type(outcome).__name__ for outcome in pair) == ["CommandNotFound", "NoneType"]
        for pair in pairs
    ), pairs


async def test_get_pending_uses_the_per_device_index_on_sqlite(tmp_path: Path) -> None:
    async with await SqlStore.connect(sqlite_url(tmp_path)) as store:
        query = (
            sa.select(command_queue.c.id)
            .where(
                command_queue.c.device_id == "dev-1",
                command_queue.c.delivered == sa.false(),
                command_queue.c.end_reason.is_(None),
            )
            .order_by(command_queue.c.seq)
        )
        compiled = query.compile(store.engine, compile_kwargs={"literal_binds": True})
        async with store.engine.connect() as conn:
            plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")).all()

    details = " ".join(str(row[-1]) for row in plan)
    assert "USING INDEX ix_command_queue_device_open (device_id=?)" in details


async def test_get_pending_can_use_the_per_device_index_on_postgres() -> None:
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema) as store,
    ):
        await store.enqueue("dev-1", b"x", 60)
        async with store.engine.connect() as conn:
            await conn.exec_driver_sql("SET enable_seqscan = off")
            plan = (
                await conn.exec_driver_sql(
                    f'EXPLAIN SELECT id FROM "{schema}".command_queue '
                    "WHERE device_id = 'dev-1' AND delivered = false AND end_reason IS NULL "
                    "ORDER BY seq"
                )
            ).all()

    assert "ix_command_queue_device_open" in " ".join(str(row[0]) for row in plan)


async def test_unreachable_database_raises_state_error() -> None:
    with pytest.raises(StateError):
        await SqlStore.connect("postgresql+asyncpg://postgres@127.0.0.1:1/none")


async def test_negative_retention_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention"):
        await SqlStore.connect(sqlite_url(tmp_path), retention=timedelta(seconds=-1))


async def _synchronous_level(store: SqlStore) -> int:
    async with store.engine.connect() as conn:
        level = await conn.scalar(sa.text("PRAGMA synchronous"))
    assert isinstance(level, int)
    return level


async def test_sqlite_fsyncs_every_commit_unless_the_url_opts_out(tmp_path: Path) -> None:
    """synchronous=FULL (2) by default; NORMAL (1) only when the URL asks for it."""
    async with await SqlStore.connect(sqlite_url(tmp_path)) as store:
        assert await _synchronous_level(store) == 2
    url = sqlite_url(tmp_path) + "?synchronous=normal"
    async with await SqlStore.connect(url) as store:
        assert await _synchronous_level(store) == 1
        await store.enqueue("dev-1", b"x", 60)
        assert await store.drain_pending("dev-1") == [b"x"]


def test_unknown_sqlite_synchronous_level_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        create_engine(sqlite_url(tmp_path) + "?synchronous=off")


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///x.db?synchronous=normal&synchronous=full",
        "postgresql+asyncpg://app@db/commands?command_timeout=5&command_timeout=30",
    ],
)
def test_a_url_option_given_twice_is_refused_by_its_name(url: str) -> None:
    # A helper saw synchronous="('normal', 'full')": the URL's two values as a tuple.
    name = url.rsplit("&", 1)[1].split("=")[0]
    with pytest.raises(ValueError, match=f"^{name} is given more than once in the state URL$"):
        create_engine(url)


async def test_plain_and_replacing_writes_store_rows_alike(tmp_path: Path) -> None:
    """Plain enqueues take the driver-level fast path, typed ones SQLAlchemy: same rows."""
    async with await SqlStore.connect(sqlite_url(tmp_path)) as store:
        plain = await store.enqueue("dev-1", b"plain", 60)
        typed = await store.enqueue_or_update("dev-1", "setpoint", b"typed", 60)
        await store.mark_published([plain, typed])
        async with store.engine.connect() as conn:
            rows = (await conn.execute(sa.select(command_queue))).mappings().all()
        by_id = {row["id"]: row for row in rows}
        for command_id in (plain, typed):
            row = by_id[command_id]
            assert row["published_at"] is not None
            assert row["created_at"].tzinfo is not None
        assert [c.id for c in await store.get_pending("dev-1")] == [plain, typed]
        assert await store.drain_pending("dev-1") == [b"plain", b"typed"]


@pytest.mark.parametrize("unknown", [0, 2, 1_000, 20_000])
async def test_deliverable_answers_windows_of_any_width(tmp_path: Path, unknown: int) -> None:
    """Window queries are padded to a few compiled widths, up to SQLite's parameter limit."""
    async with await SqlStore.connect(sqlite_url(tmp_path)) as store:
        live = [await store.enqueue("dev-1", b"x", 60) for _ in range(3)]
        ids = [*live, *(str(uuid.uuid4()) for _ in range(unknown))]

        assert sorted(await store.deliverable(ids)) == sorted(live)


async def test_the_liveness_check_reads_the_stores_own_file_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """consume()'s per-hand-out check opens the file the engine opens, not a new one."""
    monkeypatch.chdir(tmp_path)
    async with await SqlStore.connect("sqlite+aiosqlite:///relative.db") as store:
        live = await store.enqueue("dev-1", b"x", 60)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)

        assert await store.is_deliverable(live)
    assert not (elsewhere / "relative.db").exists()


def test_a_closed_liveness_check_never_reopens_its_connection(tmp_path: Path) -> None:
    check = SqliteLiveCheck(create_engine(sqlite_url(tmp_path)))
    check.close()

    assert check.is_live(str(uuid.uuid4()), datetime.now(UTC)) is None
    assert not (tmp_path / "commands.db").exists()


async def test_a_few_ids_are_read_on_the_loop_thread_as_the_driver_reads_them(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A window of a device online (one command, a few) is asked on the event loop's
    thread, a hop to the driver's saved; the answer is the same as the driver's."""
    async with await SqlStore.connect(sqlite_url(tmp_path), clock=clock) as store:
        live = await store.enqueue("dev-1", b"live", 60)
        cancelled = await store.enqueue("dev-1", b"cancelled", 60)
        await store.cancel_command(cancelled)
        waiting = await store.enqueue_with_confirmation("dev-1", "unlock", b"door", 60)
        short = await store.enqueue("dev-1", b"short", 1)
        clock.advance(2)
        ids = [live, cancelled, waiting, short, str(uuid.uuid4())]
        check = SqliteLiveCheck(store.engine)
        try:
            rows = check.deliverable(ids, clock())
            assert check.deliverable([str(uuid.uuid4())] * (FEW + 1), clock()) is None
        finally:
            check.close()
        assert rows is not None
        assert [row["id"] for row in rows] == [live]
        assert list(await store.deliverable(ids)) == [live]
        # One command by id, whatever its status, read there too: as the driver reads it.
        assert store._live_check is not None
        direct, read_there = store._live_check.one, list[str]()

        def one_there(command_id: str) -> Any:
            read_there.append(command_id)
            return direct(command_id)

        store._live_check.one = one_there  # type: ignore[method-assign]
        for command_id in ids:
            one = await store._select(statements.ONE, command_id=command_id)
            assert await store.get(command_id) == (statements.record_of(one[0]) if one else None)
        assert read_there == ids
        # A device's open commands (get_pending), in write order: on the driver's thread.
        assert store._reader is not None
        open_direct, listed = store._reader.open_commands, list[str]()

        async def open_there(device_id: str, now: datetime) -> Any:
            listed.append(device_id)
            return await open_direct(device_id, now)

        store._reader.open_commands = open_there  # type: ignore[method-assign]
        for device in ("dev-1", "dev-2"):
            rows = await store._select(statements.OPEN_COMMANDS, device=device, now=clock())
            assert await store.open_commands(device) == [statements.record_of(r) for r in rows]
        assert [command.id for command in await store.get_pending("dev-1")] == [live, waiting]
        assert listed == ["dev-1", "dev-2", "dev-1"]


async def test_the_outbox_reads_its_index_in_ready_order_without_sorting(tmp_path: Path) -> None:
    """A relay catching up on a large backlog must not sort the backlog on every pass."""
    async with await SqlStore.connect(sqlite_url(tmp_path)) as store:
        details = await sqlite_plan(store, UNPUBLISHED)

    assert "ix_command_queue_outbox_ready" in details
    assert "TEMP B-TREE" not in details


async def test_a_sqlite_store_in_a_named_schema_goes_through_sqlalchemy(tmp_path: Path) -> None:
    """The hot paths' SQL names no schema, so a schema turns them off instead of being
    ignored."""
    engine = create_engine(sqlite_url(tmp_path))
    try:
        async with SqlStore(engine, schema="main") as store:
            await store.create_table()
            command_id = await store.enqueue("dev-1", b"x", 60)
            await store.cancel_command(command_id)
            assert await store.get_status(command_id) is CommandStatus.CANCELLED
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_cleanup_times_out_a_rollout_larger_than_one_statement_takes(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Overdue commands are ended in slices: in one IN list a large rollout's ids passed the
    driver's parameter limit (32,767 on asyncpg) and every cleanup failed. The slice is made
    small here so a few commands cross it."""
    from amqp_queue.state.sql import transactions

    monkeypatch.setattr(transactions, "_SLICE", 3)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sqlite":
            store = await SqlStore.connect(sqlite_url(tmp_path), clock=clock)
        else:
            schema = await stack.enter_async_context(postgres_schema())
            store = await SqlStore.connect(POSTGRES_URL, schema=schema, clock=clock)
        await stack.enter_async_context(store)
        devices = [f"dev-{n}" for n in range(7)]
        rollout = await store.enqueue_many(devices, b"fw", 600, outcome_timeout=30)
        for device in devices:
            assert len(await store.drain_pending(device)) == 1
        clock.advance(31)
        await store.cleanup()
        statuses = {await store.get_status(command_id) for command_id in rollout.command_ids}
        assert statuses == {CommandStatus.TIMED_OUT}
