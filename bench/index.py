"""Whether the index's per-device reads stay flat as the table grows (10k vs 1M rows).

Two tables per backend, filled with a fast bulk insert (not through the API): mostly
finished commands of many devices, as a table looks after weeks of traffic within the
retention, plus one probe device whose commands are written through the API. Each run
times ``get_pending`` and ``drain_pending`` of the probe on the small and the large table
back to back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa

from bench.backends import postgres_state
from bench.harness import Context, Target
from bench.services import PAYLOAD, TTL, temp_dir
from state import SqlStore
from state.sql import command_queue

GROUP = "Index latency as the table grows"
PROBE = "probe"
PROBE_DRAIN = "probe-drain"
PER_DEVICE = 10
_COLUMNS = [column.name for column in command_queue.columns if column.name != "seq"]
_CHUNK = 50_000


def _filler(total: int, now: datetime) -> Iterator[dict[str, Any]]:
    """``total`` rows: 90% delivered, 10% open, ten per device."""
    created = now - timedelta(days=1)
    expires = now + timedelta(days=1)
    for index in range(total):
        delivered = index % 10 != 0
        yield {
            "id": str(uuid.uuid4()),
            "device_id": f"fill-{index // PER_DEVICE:07d}",
            "command_type": None,
            "payload": PAYLOAD,
            "expires_at": expires,
            "delivered": delivered,
            "requires_confirmation": False,
            "confirmed": False,
            "created_at": created,
            "confirmed_at": None,
            "end_reason": None,
            "ended_at": created if delivered else None,
            "published_at": created,
        }


def _sqlite_fill(path: Path, total: int, engine_dialect: sa.Dialect) -> None:
    """Bulk insert through the stdlib driver, values converted by the columns' own types."""
    processors = {
        name: command_queue.c[name].type.dialect_impl(engine_dialect).bind_processor(engine_dialect)
        for name in _COLUMNS
    }
    sql = (
        f"INSERT INTO command_queue ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
    )
    connection = sqlite3.connect(path)
    try:
        # Filler only: no fsync per chunk (the probe's own writes keep the store's pragmas).
        connection.execute("PRAGMA synchronous=OFF")
        rows: list[tuple[Any, ...]] = []
        for row in _filler(total, datetime.now(UTC)):
            rows.append(
                tuple(
                    value if (process := processors[name]) is None else process(value)
                    for name, value in ((name, row[name]) for name in _COLUMNS)
                )
            )
            if len(rows) == _CHUNK:
                connection.executemany(sql, rows)
                connection.commit()
                rows = []
        connection.executemany(sql, rows)
        connection.commit()
    finally:
        connection.close()


@asynccontextmanager
async def sqlite_table(total: int) -> AsyncIterator[SqlStore]:
    with temp_dir() as directory:
        path = directory / "index.db"
        store = await SqlStore.connect(f"sqlite+aiosqlite:///{path}")
        async with store:
            await asyncio.to_thread(_sqlite_fill, path, total, store.engine.dialect)
            yield store


@asynccontextmanager
async def postgres_table(total: int) -> AsyncIterator[SqlStore]:
    async with postgres_state() as state:
        assert isinstance(state, SqlStore)
        schema = state.engine.get_execution_options()["schema_translate_map"][None]
        url = state.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        connection = await asyncpg.connect(url)
        try:
            rows = _filler(total, datetime.now(UTC))
            while chunk := [tuple(row[name] for name in _COLUMNS) for row in _take(rows)]:
                await connection.copy_records_to_table(
                    "command_queue", schema_name=schema, columns=_COLUMNS, records=chunk
                )
            # What autovacuum would do soon after such a load.
            await connection.execute(f'ANALYZE "{schema}".command_queue')
        finally:
            await connection.close()
        yield state


def _take(rows: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for _, row in zip(range(_CHUNK), rows, strict=False)]


async def _latencies(store: SqlStore, calls: int) -> tuple[float, float]:
    """Median milliseconds of ``get_pending`` and of ``drain_pending`` (10 ready commands)."""
    pending: list[float] = []
    for _ in range(calls):
        started = time.perf_counter()
        found = await store.get_pending(PROBE)
        pending.append(time.perf_counter() - started)
        if len(found) != PER_DEVICE:
            raise RuntimeError(f"get_pending found {len(found)} commands, not {PER_DEVICE}")
    drains: list[float] = []
    for _ in range(max(1, calls // 2)):
        await store.add(
            [
                store.build(PROBE_DRAIN, None, PAYLOAD, TTL, requires_confirmation=False)
                for _ in range(PER_DEVICE)
            ]
        )
        started = time.perf_counter()
        drained = await store.drain_pending(PROBE_DRAIN)
        drains.append(time.perf_counter() - started)
        if len(drained) != PER_DEVICE:
            raise RuntimeError(f"drain returned {len(drained)} commands, not {PER_DEVICE}")
    return statistics.median(pending) * 1000, statistics.median(drains) * 1000


async def _probe(store: SqlStore) -> None:
    for _ in range(PER_DEVICE):
        await store.enqueue(PROBE, PAYLOAD, TTL)


async def bench_index(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    small, large = sizes.index_small, sizes.index_large
    for name, table in (("sqlite", sqlite_table), ("postgres", postgres_table)):
        started = time.perf_counter()
        async with table(small) as small_store, table(large) as large_store:
            fill_seconds = time.perf_counter() - started
            for store in (small_store, large_store):
                await _probe(store)
            for _ in range(sizes.runs):
                for rows, store in ((small, small_store), (large, large_store)):
                    pending_ms, drain_ms = await _latencies(store, sizes.index_calls)
                    for what, value in (("get_pending", pending_ms), ("drain_pending", drain_ms)):
                        results.record(
                            f"index.{name}.{what}.{rows}",
                            value,
                            group=GROUP,
                            label=f"{name}: {what} of 10 commands, {rows:,} rows in the table",
                            unit="ms",
                            better="lower",
                        )
        results.note(
            f"Index tables ({name}): {small + large:,} rows bulk-loaded in {fill_seconds:.0f} s; "
            "90% finished commands, 10% open, ten per device."
        )
        for what in ("get_pending", "drain_pending"):
            results.ratio(
                f"{name} {what} latency, {large:,} / {small:,} rows",
                f"index.{name}.{what}.{large}",
                f"index.{name}.{what}.{small}",
                Target(1.5, "lower"),
            )
