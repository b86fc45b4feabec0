"""Writes on PostgreSQL state cut short by their callers: each runs to its end first.

Found by a helper's probe of a bare ``SqlStore`` on PostgreSQL: the write transactions run on
asyncpg's connection directly, and a caller's deadline cancelled them half way: asyncpg
rolled the transaction back, even in its COMMIT, and the connection was thrown away. With
deadlines of 0.5 to 5 ms none of 200 enqueues landed (an uncut one takes about 2 ms), the
next call opened a new connection each time (64 to 96 per run), each cut connect logging
"Future exception was never retrieved"; and a COMMIT slowed to 0.3 s (a trigger standing in
for synchronous replication) was rolled back, the cut enqueue raising after 0.1 s. As on
SQLite, a write cut once begun now runs to its end, and its caller raises after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from amqp_queue import CommandStatus, SqlStore
from amqp_queue.state.sql import execution
from tests.backends import POSTGRES_URL, postgres_schema
from tests.rabbitmq_support import rabbitmq_store

# A COMMIT of a command whose payload starts with "slow" takes 0.3 s: a deferred trigger.
SLOW_COMMIT = """
CREATE FUNCTION "{schema}".slow_commit() RETURNS trigger AS $$
BEGIN
  IF substr(NEW.payload, 1, 4) = 'slow'::bytea THEN PERFORM pg_sleep(0.3); END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON "{schema}".command_queue
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{schema}".slow_commit();
"""


@asynccontextmanager
async def _store() -> AsyncIterator[SqlStore]:
    async with _store_in_schema() as (store, _):
        yield store


@asynccontextmanager
async def _store_in_schema() -> AsyncIterator[tuple[SqlStore, str]]:
    async with postgres_schema() as schema:
        store = await SqlStore.connect(POSTGRES_URL, schema=schema)
        try:
            await store.enqueue("warm", b"w", 60)  # the table is there
            async with store.engine.begin() as conn:
                driver = (await conn.get_raw_connection()).driver_connection
                assert driver is not None
                await driver.execute(SLOW_COMMIT.format(schema=schema))
            yield store, schema
        finally:
            await store.close()


async def test_an_enqueue_cut_during_its_commit_lands_before_it_raises() -> None:
    async with _store() as store:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await store.enqueue("dev", b"slow-first", 60)
        took = loop.time() - began
        await store.enqueue("dev", b"second", 60)
        assert await store.drain_pending("dev") == [b"slow-first", b"second"]
        assert took >= 0.25, f"raised after {took:.3f} s, before its COMMIT ended"


async def test_enqueues_cut_at_short_deadlines_keep_their_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rnd = random.Random(11)
    async with _store() as store:
        opened: list[object] = []
        sa.event.listen(store.engine.sync_engine, "connect", lambda *_: opened.append(1))
        returned: list[bytes] = []
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for n in range(100):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(rnd.uniform(0.0005, 0.005)):
                        await store.enqueue("dev", b"%03d" % n, 60)
                        returned.append(b"%03d" % n)
        landed = [command.payload for command in await store.get_pending("dev")]
        assert set(returned) <= set(landed)
        assert landed == sorted(landed)  # in call order
        # A call cut before its write began writes nothing; one cut after lands: most do.
        assert len(landed) >= 50, f"{len(landed)} of 100 landed"
        assert len(opened) <= 5, f"{len(opened)} connections opened for 100 calls"
        assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []


async def test_outcome_reports_cut_at_short_deadlines_get_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway reporting each command's outcome under a short deadline, trying again when
    cut: on PostgreSQL the report's delivery mark is one statement on asyncpg's connection,
    which a cut cancelled and spoilt, so 0 of 10 reports got through in 3,000 tries (a
    helper's probe), with hundreds of connections opened."""
    rnd = random.Random(2)
    async with (
        postgres_schema() as schema,
        rabbitmq_store(tmp_path, state_url=f"{POSTGRES_URL}?schema={schema}") as store,
    ):
        opened: list[object] = []
        engine = store.state.engine  # type: ignore[attr-defined]
        sa.event.listen(engine.sync_engine, "connect", lambda *_: opened.append(1))
        ids = [await store.enqueue("gw-1", b"%d" % n, 600) for n in range(10)]
        reported = tries = 0
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with store.consume("gw-1") as commands:
                async for command in commands:
                    while tries < 1_000:
                        tries += 1
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(rnd.uniform(0.0001, 0.005)):
                                await command.complete(b"done")
                                reported += 1
                                break
                    if reported == 10 or tries >= 1_000:
                        break
        assert reported == 10, f"{reported} of 10 reports in {tries} tries"
        assert [await store.get_status(i) for i in ids] == [CommandStatus.SUCCEEDED] * 10
        assert len(opened) <= 5, f"{len(opened)} connections opened in {tries} tries"
        assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []


async def test_a_cut_write_that_then_dies_a_deadlock_victim_stays_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run to its end through the caller's cut, a transaction that then failed as a deadlock
    victim must not be run again: the cut is raised, not lost (a review found the retry
    taking the CancelledError for the deadlock it was chained to, and the call returning)."""
    async with _store() as store:
        writes = store._pg_writes
        assert writes is not None
        real = writes.run
        runs = 0

        async def run(*args: Any, **kwargs: Any) -> Any:
            nonlocal runs
            runs += 1
            if runs == 1:
                await asyncio.sleep(0.2)  # waits on a lock, then is picked as the victim
                raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
            return await real(*args, **kwargs)

        monkeypatch.setattr(writes, "run", run)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await store.enqueue("dev", b"x", 60)
        assert runs == 1
        runs = 0
        task = asyncio.ensure_future(store.enqueue("dev", b"y", 60))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runs == 1
        assert await store.get_pending("dev") == []


@pytest.mark.parametrize("held", [0.6, 4.0])
async def test_a_cut_write_waits_for_its_end_within_a_bound(
    held: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut write waits for a row lock another transaction holds, as long as the bound
    (here 1.5 s, ``CUT_WRITE_WAIT``): held 0.6 s, the cancel lands and the caller raises
    after it; held 4 s, the caller raises at the bound and the cancel is rolled back (a
    review: with no bound, only asyncpg's ``command_timeout`` of 300 s held it)."""
    monkeypatch.setattr(execution, "CUT_WRITE_WAIT", 1.5)
    async with _store_in_schema() as (store, schema):
        command_id = await store.enqueue("dev", b"x", 600)
        other = await asyncpg.connect(POSTGRES_URL.replace("+asyncpg", ""))
        holding = other.transaction()
        await holding.start()
        await other.execute(
            f'SELECT 1 FROM "{schema}".command_queue WHERE id = $1 FOR UPDATE', command_id
        )

        async def release() -> None:
            await asyncio.sleep(held)
            await holding.rollback()

        releasing = asyncio.ensure_future(release())
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await store.cancel_command(command_id)
        took = loop.time() - began
        await releasing
        await other.close()
        status = await store.get_status(command_id)
        if held < 1.5:
            assert took >= held - 0.05, f"raised after {took:.2f} s"
            assert status == CommandStatus.CANCELLED
        else:
            assert 1.4 <= took < 2.5, f"raised after {took:.2f} s"
            assert status == CommandStatus.PENDING
        # The store goes on: another write, on a connection of its own if it had to.
        await store.enqueue("dev", b"y", 600)
