"""Several processes opening one PostgreSQL database at once, as sidecar replicas do: a fresh
one, and one the first release made, which they upgrade."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from amqp_queue.state.sql import command_queue
from amqp_queue.state.sql.schema_versions import VERSION_TABLE, revisions
from tests.backends import POSTGRES_URL
from tests.legacy_schema import OLD_ROWS, build
from tests.support import FULL_MATRIX, unique

REPO = Path(__file__).resolve().parent.parent
REPLICAS = 4
ROUNDS = 5 if FULL_MATRIX else 2  # the test command's short form; make reliability: 5
UPGRADE_ROUNDS = 2

# Run with ``-c`` from the repository, so that it imports this working copy. Everything but
# the store's own start is done before "ready", so the replicas race only in connect().
REPLICA = """
import asyncio, sys
import asyncpg, sqlalchemy.dialects.postgresql.asyncpg
from amqp_queue.state import SqlStore

async def start(url):
    store = await SqlStore.connect(url)
    await store.close()

print("ready", flush=True)
sys.stdin.readline()
asyncio.run(start(sys.argv[1]))
"""


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    name = unique("t_start_")
    admin = create_async_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.dispose()


async def start_together(url: str) -> list[str]:
    """Starts the replicas, releases them at once; the error of each one that failed."""
    replicas = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            REPLICA,
            url,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(REPLICAS)
    ]
    for replica in replicas:
        assert replica.stdout is not None
        assert await replica.stdout.readline() == b"ready\n"
    for replica in replicas:
        assert replica.stdin is not None
        replica.stdin.write(b"go\n")
        replica.stdin.close()
    outputs = [await replica.communicate() for replica in replicas]
    return [
        _error_line(stderr.decode())
        for replica, (_, stderr) in zip(replicas, outputs, strict=True)
        if replica.returncode != 0
    ]


def _error_line(stderr: str) -> str:
    """The line of a traceback that names the exception raised last."""
    lines = stderr.strip().splitlines() or ["no output"]
    return next((line for line in reversed(lines) if "Error: " in line), lines[-1])


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_replicas_starting_together_on_a_fresh_database_all_start() -> None:
    """Concurrent CREATE TABLE on PostgreSQL collides in its catalog (pg_type's unique
    index) unless the creators take turns."""
    for _ in range(ROUNDS):
        async with fresh_database() as url:
            failures = await start_together(url)
            engine = create_async_engine(url)
            try:
                async with engine.connect() as conn:
                    count = await conn.scalar(sa.select(sa.func.count()).select_from(command_queue))
            finally:
                await engine.dispose()

        assert failures == []
        assert count == 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_replicas_starting_together_on_a_first_release_database_upgrade_it_once() -> None:
    """Each would find the table unversioned and upgrade it; under the schema lock the first
    does, and the others find it at the head."""
    for _ in range(UPGRADE_ROUNDS):
        async with fresh_database() as url:
            await build(url, None)
            failures = await start_together(url)
            engine = create_async_engine(url)
            try:
                async with engine.connect() as conn:
                    count = await conn.scalar(sa.select(sa.func.count()).select_from(command_queue))
                    versions = (await conn.exec_driver_sql(f"SELECT * FROM {VERSION_TABLE}")).all()
            finally:
                await engine.dispose()

        assert failures == []
        assert count == len(OLD_ROWS)
        assert [tuple(row) for row in versions] == [(revisions()[-1],)]
