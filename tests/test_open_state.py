"""Choosing the state index by URL: a PostgreSQL schema named on the URL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from amqp_queue import RabbitMQStore, StateError
from amqp_queue.state import SqlStore, open_state
from tests.backends import POSTGRES_URL, postgres_schema
from tests.rabbitmq_support import rabbitmq_store

# Nothing listens on port 1: a URL refused before any connection never gets a StateError.
UNREACHABLE = "postgresql+asyncpg://postgres@127.0.0.1:1/none"


async def test_a_postgres_url_with_a_schema_opens_the_index_in_that_schema() -> None:
    async with (
        postgres_schema() as schema,
        await open_state(f"{POSTGRES_URL}?schema={schema}") as state,
    ):
        assert isinstance(state, SqlStore)
        await state.enqueue("dev-1", b"x", 60)
        async with state.engine.connect() as conn:
            found = await conn.execute(sa.text(f'SELECT count(*) FROM "{schema}".command_queue'))
            held = found.scalar()

    assert held == 1


async def test_rabbitmq_store_opens_its_state_in_the_schema_its_url_names(tmp_path: Path) -> None:
    async with (
        postgres_schema() as schema,
        rabbitmq_store(tmp_path, state_url=f"{POSTGRES_URL}?schema={schema}") as store,
    ):
        assert isinstance(store, RabbitMQStore)
        assert isinstance(store.state, SqlStore)
        command_id = await store.enqueue("dev-1", b"x", 60)
        async with store.state.engine.connect() as conn:
            found = await conn.execute(sa.text(f'SELECT id FROM "{schema}".command_queue'))
            held = [str(each) for each in found.scalars()]

    assert held == [command_id]


@pytest.mark.parametrize(
    "schema", ["", "queue-1", "queue.x", "a;drop", "1queue", '"queue"', "q" * 64, "quéue"]
)
async def test_a_schema_that_is_not_an_identifier_is_refused_before_connecting(
    schema: str,
) -> None:
    with pytest.raises(ValueError, match="schema"):
        await open_state(f"{UNREACHABLE}?schema={schema}")


async def test_a_schema_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="schema"):
        await open_state(f"{UNREACHABLE}?schema=one&schema=two")


async def test_a_schema_on_a_sqlite_url_is_refused(tmp_path: Path) -> None:
    """SQLite has no schemas to put the table in: the option would be ignored."""
    with pytest.raises(ValueError, match="schema"):
        await open_state(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}?schema=queue")
    assert not (tmp_path / "c.db").exists()


async def test_a_sqlite_file_that_cannot_open_leaves_no_driver_thread_behind(
    tmp_path: Path,
) -> None:
    # aiosqlite stops its worker thread after a failed open without waiting for it; the
    # thread then answers on the caller's loop, and a CLI whose loop has closed by then
    # printed the thread's "Event loop is closed" traceback under its one-line error.
    url = f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'state.db'}"
    left_running = []
    for _ in range(20):
        before = set(threading.enumerate())
        with pytest.raises(StateError, match="unable to open database file"):
            await open_state(url)
        left_running += [
            t.name
            for t in threading.enumerate()
            if t not in before and "_connection_worker_thread" in t.name
        ]

    assert left_running == []
