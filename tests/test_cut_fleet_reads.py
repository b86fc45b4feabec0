"""PostgreSQL reads of the fleet's views cut short by their callers.

``rollout_summary``, ``device_history``, ``awaiting_confirmation`` and ``devices_with_open``
read through a pooled connection of the engine in autocommit. A read cut by its caller's
deadline interrupted asyncpg half way: the connection was thrown away (the next read opened
a new one) and asyncio logged "Future exception was never retrieved" (a helper's probe: 39
to 52 of 120 cuts per call). A cut read now runs on by itself and its connection goes back
to the pool, as the store's kept reads do.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from amqp_queue import SqlStore
from tests.backends import BACKENDS

pytestmark = pytest.mark.timeout(60)

CUTS = 60


async def test_cut_fleet_reads_leave_no_error_behind_and_keep_their_connections(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[str] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(str(context.get("message"))))
    rng = random.Random(5)
    async with BACKENDS["postgres"](tmp_path) as store:
        assert isinstance(store, SqlStore)
        rollout = await store.enqueue_many([f"gw-{n}" for n in range(50)], b"fw", 600)
        await store.enqueue_with_confirmation("gw-1", "unlock", b"door", 600)
        reads: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.rollout_summary(rollout.rollout_id),
            lambda: store.device_history("gw-1"),
            lambda: store.awaiting_confirmation(),
            lambda: store.devices_with_open(),
        ]
        opened: list[object] = []
        event.listen(store.engine.sync_engine, "connect", lambda conn, _: opened.append(conn))
        for _ in range(CUTS):
            for read in reads:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(read(), rng.uniform(0, 0.004))
        await asyncio.sleep(0.5)  # the reads left to finish by themselves end
        for read in reads:
            await read()  # the store still answers
        gc.collect()  # a lost future's error is reported when it is collected
        await asyncio.sleep(0)
    assert not unhandled, f"{len(unhandled)} errors nobody retrieved: {unhandled[:3]}"
    assert len(opened) <= 10, f"{len(opened)} connections opened for {CUTS * 4} cut reads"


async def test_reads_left_to_finish_end_before_the_store_closes(tmp_path: Path) -> None:
    """Cut reads run on by themselves, but not past their store's close: once ``close()``
    returned, none of them ran and every connection they took was closed (a helper's probe:
    84 to 246 reads still running as close returned, then 3 to 5 connections left open)."""
    async with BACKENDS["postgres"](tmp_path) as store:
        assert isinstance(store, SqlStore)
        rollout = await store.enqueue_many([f"gw-{n}" for n in range(50)], b"fw", 600)
        connections: list[Any] = []
        event.listen(store.engine.sync_engine, "connect", lambda conn, _: connections.append(conn))
        rng = random.Random(9)
        reads: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.rollout_summary(rollout.rollout_id),
            lambda: store.device_history("gw-1"),
            lambda: store.get_pending("gw-2"),
            lambda: store.get_status(rollout.command_ids[3]),
        ]

        async def cut_read() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rng.choice(reads)(), rng.uniform(0, 0.01))

        for _ in range(6):  # concurrent callers: the kept connections busy, reads pooled
            await asyncio.gather(*(cut_read() for _ in range(40)))
        await store.close()
        running = [
            task
            for task in asyncio.all_tasks()
            if "_autocommit_read" in repr(task) or "_on_pooled" in repr(task)
        ]
        assert not running, f"{len(running)} reads still running after close()"
        await asyncio.sleep(0.5)
        left_open = [conn for conn in connections if not conn.driver_connection.is_closed()]
        assert not left_open, f"{len(left_open)} connections left open after close()"
