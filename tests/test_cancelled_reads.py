"""Reads of the index cut short by their callers (a deadline, ``Task.cancel``).

Found while testing cancelled drains: on an in-memory SQLite database, a ``get_status`` cut
half way made SQLAlchemy throw its pooled connection away, and the database with it: the
next call failed "no such table: command_queue" (200 of 200 runs, at the first cut). A read
now runs to its end through its caller's cancellation, and every later call tells the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from amqp_queue import CommandStatus, SqlStore, Store
from tests.backends import BACKENDS, INDEX_BACKENDS, POSTGRES_URL, postgres_schema
from tests.rabbitmq_support import rabbitmq_store


def _reads(store: Store, ids: list[str]) -> list[Callable[[], Awaitable[object]]]:
    return [
        lambda: store.get_status(ids[0]),
        lambda: store.get_pending("d1"),
        lambda: store.get_pending_confirmations("d1"),
        lambda: store.get_command(ids[1]),
        lambda: store.get_outcome(ids[0]),
        lambda: store.awaiting_confirmation(),
        lambda: store.devices_with_open(),
        lambda: store.device_history("d1"),
    ]


async def _cut_reads_then_check(store: Store, seed: int) -> None:
    rnd = random.Random(seed)
    ids = [await store.enqueue("d1", b"a", 600)]
    ids.append(await store.enqueue_with_confirmation("d1", "reboot", b"b", 600))
    reads = _reads(store, ids)
    for _ in range(120):
        read = asyncio.ensure_future(rnd.choice(reads)())
        await asyncio.sleep(rnd.uniform(0, 0.002))
        read.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await read
        assert await store.get_status(ids[0]) is CommandStatus.PENDING
    assert [c.id for c in await store.get_pending("d1")] == ids
    assert [c.id for c in await store.get_pending_confirmations("d1")] == [ids[1]]
    await store.confirm_command(ids[1])
    assert await store.drain_pending("d1") == [b"a", b"b"]


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "file"])
async def test_cut_reads_leave_a_sqlite_store_whole(url: str, tmp_path: Path) -> None:
    if url == "file":
        url = f"sqlite+aiosqlite:///{tmp_path / 'reads.db'}"
    async with await SqlStore.connect(url) as store:
        await _cut_reads_then_check(store, 3)


@pytest.mark.parametrize("backend", [b for b in INDEX_BACKENDS if b != "sqlite"])
async def test_cut_reads_leave_the_store_whole(backend: str, tmp_path: Path) -> None:
    async with BACKENDS[backend](tmp_path) as store:
        await _cut_reads_then_check(store, 5)


async def test_a_stream_polled_with_short_deadlines_keeps_its_postgresql_connection(
    tmp_path: Path,
) -> None:
    """A gateway polling ``consume()`` with a short deadline on PostgreSQL state: each poll
    that cut a read spoilt the kept asyncpg connection, and the next read opened a new one.
    20 commands took 82,346 polls and 2,310 new connections on the old code (a quorum-order
    trial timed out under load doing that), with a "Future exception was never retrieved"
    logged for each. The cut read now finishes by itself on its connection."""
    rnd = random.Random(8)
    async with postgres_schema() as schema:
        state_url = f"{POSTGRES_URL}?schema={schema}"
        async with rabbitmq_store(tmp_path, state_url=state_url) as store:
            opened: list[object] = []
            engine = store.state.engine  # type: ignore[attr-defined]
            sa.event.listen(engine.sync_engine, "connect", lambda *_: opened.append(1))
            for n in range(20):
                await store.enqueue("dev", b"%02d" % n, 600)
            got: list[bytes] = []
            polls = 0
            async with store.consume("dev") as stream:
                while len(got) < 20 and polls < 5_000:
                    polls += 1
                    with contextlib.suppress(TimeoutError):
                        deadline = rnd.uniform(0, 0.004)
                        got.append((await asyncio.wait_for(anext(stream), deadline)).payload)
            assert got == [b"%02d" % n for n in range(20)], f"{len(got)} in {polls} polls"
            # A cut read left running keeps the kept connection busy, and the next read takes
            # a pooled one: under load a few more open (4 seen in the test command), not one
            # per cut read.
            assert len(opened) <= 10, f"{len(opened)} connections opened in {polls} polls"


async def test_streams_polled_with_short_deadlines_all_get_their_commands(tmp_path: Path) -> None:
    """Gateways polling at once: the kept connection busy, reads run on pooled ones, which a
    cut used to spoil as well (six streams had not handed out their 120 commands after
    30,000 polls). A cut read there also finishes by itself."""
    rnd = random.Random(6)
    devices = [f"d{n}" for n in range(4)]
    async with postgres_schema() as schema:
        state_url = f"{POSTGRES_URL}?schema={schema}"
        async with rabbitmq_store(tmp_path, state_url=state_url) as store:
            for n in range(20):
                for device in devices:
                    await store.enqueue(device, b"%02d" % n, 600)
            polls = 0

            async def gateway(device: str) -> list[bytes]:
                nonlocal polls
                got: list[bytes] = []
                async with store.consume(device) as stream:
                    while len(got) < 20 and polls < 4_000:
                        polls += 1
                        with contextlib.suppress(TimeoutError):
                            deadline = rnd.uniform(0, 0.004)
                            got.append((await asyncio.wait_for(anext(stream), deadline)).payload)
                return got

            got = await asyncio.gather(*map(gateway, devices))
            assert got == [[b"%02d" % n for n in range(20)]] * 4, f"after {polls} polls"
