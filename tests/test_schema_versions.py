"""Schema versions: a database any earlier release made opens at this release's schema with
its commands intact, one a newer release made is refused, and ``amqp-queue migrate``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from amqp_queue.cli import cli
from amqp_queue.state import CommandStatus, SqlStore, StateError
from amqp_queue.state.model import CommandRecord, EndReason
from amqp_queue.state.sql.schema_versions import (
    FIRST_RELEASE,
    HEAD_REVISION,
    VERSION_TABLE,
    revisions,
)
from tests.backends import POSTGRES_URL, postgres_schema
from tests.legacy_schema import NOW, OLD_ROWS, UNVERSIONED_LAYOUTS, build, insert_rows, run_sql
from tests.support import FakeClock, unique

HEAD = revisions()[-1]
Snapshot = dict[str, list[tuple[Any, ...]]]


@asynccontextmanager
async def database(kind: str, tmp_path: Path, name: str) -> AsyncIterator[tuple[str, str | None]]:
    """A new, empty database of ``kind``: its URL and the schema to use in it."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / name}.db", None
        return
    async with postgres_schema() as schema:
        yield POSTGRES_URL, schema


async def snapshot(url: str, schema: str | None) -> Snapshot:
    """Everything the database's catalog says of the index's tables in ``schema``, with the
    schema's name taken out (columns, types, defaults, constraints, index definitions), and
    the revision in our version table."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                return await _sqlite_catalog(conn)
            assert schema is not None
            return await _postgres_catalog(conn, schema)
    finally:
        await engine.dispose()


async def _sqlite_catalog(conn: AsyncConnection) -> Snapshot:
    rows = await conn.execute(
        sa.text(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "WHERE tbl_name != 'command_queue_version'"
        )
    )
    master = sorted(_sqlite_entry(*row) for row in rows)
    versions = await _versions(conn, VERSION_TABLE)
    return {"master": master, "version": versions}


def _sqlite_entry(kind: str, name: str, table: str, sql: str | None) -> tuple[Any, ...]:
    return kind, name, table, sql and _words(sql)


def _words(sql: str) -> str:
    """SQL as SQLite keeps it, whitespace aside."""
    return re.sub(r"\s*([(),])\s*", r"\1", " ".join(sql.split()))


async def _postgres_catalog(conn: AsyncConnection, schema: str) -> Snapshot:
    queries = {
        "columns": "SELECT table_name, column_name, ordinal_position, data_type, is_nullable, "
        "column_default FROM information_schema.columns WHERE table_schema = :schema "
        "AND table_name != 'command_queue_version'",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = :schema AND tablename != 'command_queue_version'",
        "constraints": "SELECT conrelid::regclass::text, conname, contype::text, "
        "pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE connamespace = CAST(:schema AS regnamespace) "
        "AND conname != 'command_queue_version_pkc'",
    }
    found: Snapshot = {}
    for name, query in queries.items():
        rows = await conn.execute(sa.text(query), {"schema": schema})
        found[name] = sorted(
            tuple(str(v).replace(f"{schema}.", "") if v is not None else v for v in row)
            for row in rows
        )
    found["version"] = await _versions(conn, f'"{schema}".{VERSION_TABLE}')
    return found


async def _versions(conn: AsyncConnection, table: str) -> list[tuple[Any, ...]]:
    try:
        return [tuple(row) for row in await conn.exec_driver_sql(f"SELECT * FROM {table}")]
    except sa.exc.DBAPIError:
        return []


# What get_status answers for each of OLD_ROWS at NOW.
OLD_STATUSES = {
    "published": CommandStatus.PENDING,
    "setpoint-20": CommandStatus.PENDING,
    "setpoint-19": CommandStatus.SUPERSEDED,
    "door": CommandStatus.AWAITING_CONFIRMATION,
    "gate": CommandStatus.PENDING,
    "delivered": CommandStatus.DELIVERED,
    "cancelled": CommandStatus.CANCELLED,
    "stale": CommandStatus.EXPIRED,
    "other-device": CommandStatus.PENDING,
}


def old_record(name: str) -> CommandRecord:
    values = OLD_ROWS[name].values()
    reason = values.pop("end_reason")
    return CommandRecord(**values, end_reason=None if reason is None else EndReason(reason))


async def fresh_snapshot(kind: str, tmp_path: Path) -> Snapshot:
    async with database(kind, tmp_path, "fresh") as (url, schema):
        await (await SqlStore.connect(url, schema=schema)).close()
        return await snapshot(url, schema)


def test_the_head_known_without_alembic_is_the_scripts_head() -> None:
    """A store opening a database at the head skips Alembic on this constant alone."""
    assert revisions()[-1] == HEAD_REVISION
    assert revisions()[0] == FIRST_RELEASE


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_first_release_database_opens_upgraded_with_its_commands_intact(
    kind: str, tmp_path: Path
) -> None:
    async with database(kind, tmp_path, "old") as (url, schema):
        await build(url, schema)
        async with await SqlStore.connect(url, schema=schema, clock=FakeClock(NOW)) as store:
            records = {name: await store.get(row.id) for name, row in OLD_ROWS.items()}
            statuses = {name: await store.get_status(row.id) for name, row in OLD_ROWS.items()}
            pending = [command.id for command in await store.get_pending("gw-1")]
            outbox = [record.id for record in await store.unpublished(10)]
            await store.enqueue_or_update("gw-1", "setpoint", b"setpoint-21", 60)
            drained = await store.drain_pending("gw-1")
            replaced = await store.get_status(OLD_ROWS["setpoint-20"].id)
        upgraded = await snapshot(url, schema)

    ids = {name: row.id for name, row in OLD_ROWS.items()}
    assert records == {name: old_record(name) for name in OLD_ROWS}
    assert statuses == OLD_STATUSES
    assert pending == [ids["published"], ids["setpoint-20"], ids["door"], ids["gate"]]
    assert outbox == [ids["setpoint-20"], ids["other-device"], ids["gate"]]  # ready order
    assert replaced == CommandStatus.SUPERSEDED
    assert drained == [b"published", b"gate", b"setpoint-21"]
    assert upgraded == await fresh_snapshot(kind, tmp_path)
    assert upgraded["version"] == [(HEAD,)]


@pytest.mark.parametrize("layout", sorted(UNVERSIONED_LAYOUTS))
async def test_every_layout_of_the_releases_before_schema_versions_upgrades_alike(
    layout: str, tmp_path: Path
) -> None:
    """Those releases added and dropped indexes on a table they found, each in its own way:
    whatever they left becomes the same schema."""
    async with database("sqlite", tmp_path, "old") as (url, schema):
        await build(url, schema, layout)
        async with await SqlStore.connect(url, clock=FakeClock(NOW)) as store:
            statuses = {name: await store.get_status(row.id) for name, row in OLD_ROWS.items()}

        assert await snapshot(url, schema) == await fresh_snapshot("sqlite", tmp_path)
    assert statuses == OLD_STATUSES


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_the_revisions_replayed_step_by_step_build_the_fresh_schema(
    kind: str, tmp_path: Path
) -> None:
    """Revision 0001 is the first release's schema; every revision after it, up to the head,
    ends exactly where a fresh database starts (which is made from schema.py)."""
    async with database(kind, tmp_path, "first") as (url, schema):
        await build(url, schema)
        first_release = await snapshot(url, schema)
    async with database(kind, tmp_path, "replayed") as (url, schema):
        engine = create_async_engine(url)
        try:
            async with SqlStore(engine, schema=schema) as store:
                at_first = await store.migrate(FIRST_RELEASE)
                await run_sql(url, schema, insert_rows())
                replayed_first = await snapshot(url, schema)
                steps = [await store.migrate(revision) for revision in revisions()[1:]]
        finally:
            await engine.dispose()
        replayed = await snapshot(url, schema)

    assert (at_first.before, at_first.after) == (None, FIRST_RELEASE)
    assert [(step.before, step.after) for step in steps] == list(
        zip(revisions(), revisions()[1:], strict=False)
    )
    assert {**replayed_first, "version": []} == {**first_release, "version": []}
    assert replayed == await fresh_snapshot(kind, tmp_path)


async def test_a_downgrade_to_the_first_release_leaves_its_schema_with_the_rows(
    tmp_path: Path,
) -> None:
    async with database("sqlite", tmp_path, "first") as (url, schema):
        await build(url, schema)
        first_release = await snapshot(url, schema)
    async with database("sqlite", tmp_path, "down") as (url, schema):
        async with await SqlStore.connect(url) as store:
            await run_sql(url, schema, insert_rows())
            change = await store.migrate(FIRST_RELEASE)
        downgraded = await snapshot(url, schema)
        async with await SqlStore.connect(url, clock=FakeClock(NOW)) as again:
            statuses = {name: await again.get_status(row.id) for name, row in OLD_ROWS.items()}

    assert (change.before, change.after) == (HEAD, FIRST_RELEASE)
    assert downgraded == {**first_release, "version": [(FIRST_RELEASE,)]}
    assert statuses == OLD_STATUSES  # and the next start upgrades it again


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_database_a_newer_release_upgraded_is_refused_and_left_alone(
    kind: str, tmp_path: Path
) -> None:
    async with database(kind, tmp_path, "newer") as (url, schema):
        async with await SqlStore.connect(url, schema=schema) as store:
            await store.enqueue("gw-1", b"x", 60)
        table = VERSION_TABLE if schema is None else f'"{schema}".{VERSION_TABLE}'
        await run_sql(url, None, f"UPDATE {table} SET version_num = '9001'")
        before = await snapshot(url, schema)

        with pytest.raises(StateError, match=r"revision '9001', newer than this release"):
            await SqlStore.connect(url, schema=schema)

        assert await snapshot(url, schema) == before


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_an_applications_own_alembic_version_is_neither_read_nor_touched(
    kind: str, tmp_path: Path
) -> None:
    """SqlStore(engine) shares an application's database, whose own Alembic history keeps
    its revision in the default ``alembic_version``: ours is a table of its own."""
    async with database(kind, tmp_path, "shared") as (url, schema):
        await run_sql(
            url,
            schema,
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
            "INSERT INTO alembic_version VALUES ('ae1027a6acf')",
        )
        async with await SqlStore.connect(url, schema=schema) as store:
            await store.enqueue("gw-1", b"x", 60)
        await (await SqlStore.connect(url, schema=schema)).close()
        table = "alembic_version" if schema is None else f'"{schema}".alembic_version'
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                apps = (await conn.exec_driver_sql(f"SELECT * FROM {table}")).all()
        finally:
            await engine.dispose()

    assert [tuple(row) for row in apps] == [("ae1027a6acf",)]


def migrate(*args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``amqp-queue migrate``, run in this process."""
    result = CliRunner().invoke(cli, ["migrate", *args])
    return result.exit_code, result.stdout, result.stderr


def test_migrate_upgrades_a_first_release_database_and_prints_the_revisions(
    tmp_path: Path,
) -> None:
    empty = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    old = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    asyncio.run(build(old, None))

    assert migrate("--state-url", empty)[:2] == (0, f"none -> {HEAD}\n")
    assert migrate("--state-url", old)[:2] == (0, f"{FIRST_RELEASE} -> {HEAD}\n")
    code, out, _ = migrate("--state-url", old, "--json")
    assert (code, json.loads(out)) == (0, {"before": HEAD, "after": HEAD})
    asyncio.run(run_sql(old, None, f"UPDATE {VERSION_TABLE} SET version_num = '9001'"))
    code, out, err = migrate("--state-url", old)
    assert (code, out) == (1, "")
    assert "'9001'" in err


def test_migrate_takes_a_postgres_schema_from_the_url() -> None:
    # Sync, as migrate runs an event loop of its own.
    schema = unique("t_")
    asyncio.run(run_sql(POSTGRES_URL, None, f'CREATE SCHEMA "{schema}"'))
    try:
        asyncio.run(build(POSTGRES_URL, schema))
        url = make_url(POSTGRES_URL).update_query_dict({"schema": schema})
        outcome = migrate("--state-url", url.render_as_string(hide_password=False))
        found = asyncio.run(snapshot(POSTGRES_URL, schema))["version"]
    finally:
        asyncio.run(run_sql(POSTGRES_URL, None, f'DROP SCHEMA "{schema}" CASCADE'))

    assert outcome[:2] == (0, f"{FIRST_RELEASE} -> {HEAD}\n")
    assert found == [(HEAD,)]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--state-url", "redis://:s3cret@127.0.0.1:6379/0"], 2, "only a SQL state index"),
        (["--revision", "0000"], 2, "no schema revision '0000'"),
    ],
)
def test_migrate_refuses_what_it_cannot_do(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    exit_code, out, err = migrate("--state-url", url, *args)

    assert (exit_code, out) == (code, "")
    assert message in err
    assert "s3cret" not in err


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_0004_database_with_commands_upgrades_to_who_did_what(
    kind: str, tmp_path: Path
) -> None:
    """Revision 0005 (who enqueued, confirmed, cancelled; the fleet-wide lists' indexes) on a
    database at 0004 holding commands of every kind 0004 knows: they keep their fields and
    statuses, name nobody, and take names from then on."""
    clock = FakeClock(NOW)
    async with database(kind, tmp_path, "at-0004") as (url, schema):
        engine = create_async_engine(url)
        try:
            async with SqlStore(engine, schema=schema, clock=clock) as store:
                await store.migrate("0004")
                await run_sql(url, schema, insert_rows())
                # Rows written by 0004's columns: a rollout awaiting confirmation, one
                # delivered with an outcome.
                await run_sql(
                    url,
                    schema,
                    sa.text(
                        "UPDATE command_queue SET rollout_id = :rollout, outcome_timeout = 60 "
                        "WHERE requires_confirmation = :yes"
                    ).bindparams(
                        sa.bindparam(
                            "rollout",
                            "11111111-1111-1111-1111-111111111111",
                            type_=sa.Uuid(as_uuid=False),
                        ),
                        sa.bindparam("yes", True),
                    ),
                )
                change = await store.migrate(HEAD)
                after = {name: await store.get_status(row.id) for name, row in OLD_ROWS.items()}
                records = [await store.get_command(row.id) for row in OLD_ROWS.values()]
                waiting = await store.awaiting_confirmation()
                for record in waiting:
                    await store.confirm_command(record.id, by="approver")
                confirmed = [await store.get_command(record.id) for record in waiting]
        finally:
            await engine.dispose()

    assert (change.before, change.after) == ("0004", HEAD)
    assert after == OLD_STATUSES
    assert all(
        (record.enqueued_by, record.confirmed_by, record.cancelled_by) == (None, None, None)
        for record in records
    )
    assert waiting
    assert all(record.rollout_id is not None for record in waiting)
    assert {record.confirmed_by for record in confirmed} == {"approver"}
