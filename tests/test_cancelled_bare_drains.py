"""A drain of a bare state store cut short by its caller (a deadline, ``Task.cancel``).

Found by an adversarial run of the public API against every backend:

- On PostgreSQL the drain's one transaction committed while its caller was cancelled during
  the COMMIT: its commands ended ``DELIVERED`` and no drain ever returned them (42 to 130 of
  200 in a run).
- On a SQLite file a drain cancelled mid-transaction left its pooled connection holding the
  write lock until the garbage collector found it: the store's next enqueue waited the busy
  timeout (10 s) and failed "database is locked".

A drain cut before its hand-over returns nothing and whatever it claimed goes back; cut once
its hand-over began, it runs to its end and returns what it delivered (since the twenty-first
session: see tests/test_bare_drain_cut_after_hand_over.py). Nothing is lost, and the store goes
on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, SqlStore, Store
from tests.backends import BACKENDS, INDEX_BACKENDS


@pytest.mark.parametrize("backend", INDEX_BACKENDS)
async def test_drains_cut_short_by_their_callers_lose_nothing(backend: str, tmp_path: Path) -> None:
    rnd = random.Random(7)
    async with BACKENDS[backend](tmp_path) as store:
        assert isinstance(store, Store)
        ids: dict[bytes, str] = {}
        got: list[bytes] = []
        for n in range(200):
            payload = b"%03d" % n
            ids[payload] = await store.enqueue("dev", payload, 600)
            if n % 2:
                # Cut short: it returns what it delivered, or nothing and gives back its claim.
                with contextlib.suppress(TimeoutError):
                    got += await asyncio.wait_for(
                        store.drain_pending("dev"), rnd.uniform(0.0001, 0.004)
                    )
        got += await store.drain_pending("dev")

        lost = [payload for payload in ids if payload not in got]
        assert not lost, f"{len(lost)} of 200 never returned by a drain"
        assert got == sorted(set(got))  # once each, in order
        for command_id in ids.values():
            assert await store.get_status(command_id) is CommandStatus.DELIVERED


async def test_a_cancelled_drain_leaves_no_write_lock_behind_on_sqlite(tmp_path: Path) -> None:
    async with await SqlStore.connect(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}") as store:
        sent: list[bytes] = []
        got: list[bytes] = []
        for round_ in range(40):
            for i in range(3):
                payload = b"%02d-%d" % (round_, i)
                started = time.monotonic()
                await store.enqueue("d1", payload, 600)
                assert time.monotonic() - started < 2, "the enqueue waited for a lock"
                sent.append(payload)
            for timeout in (0.0003, 0.001, 0.003):
                with contextlib.suppress(TimeoutError):
                    got += await asyncio.wait_for(store.drain_pending("d1"), timeout)
        got += await store.drain_pending("d1")
        assert got == sent


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "file"])
async def test_writes_cut_short_by_their_callers_leave_the_store_working(
    url: str, tmp_path: Path
) -> None:
    """Every kind of write cancelled at random moments, then the store must answer at once
    and tell the truth. An in-memory database has no writer thread: each write goes through
    the engine's one connection, which a cut transaction made the pool throw away, and the
    table with it ("no such table" on the old code); on a file, "database is locked"."""
    if url == "file":
        url = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"
    rnd = random.Random(11)
    async with await SqlStore.connect(url) as store:
        ids = [await store.enqueue_or_update("d1", f"t{n}", b"x", 600) for n in range(30)]
        waiting = [
            await store.enqueue_with_confirmation("d2", f"c{n}", b"y", 600) for n in range(30)
        ]
        returned = 0
        for plain, confirmable in zip(ids, waiting, strict=True):
            calls: list[Callable[[], Awaitable[object]]] = [
                functools.partial(store.cancel_command, plain),
                functools.partial(store.confirm_command, confirmable),
                store.cleanup,
                functools.partial(store.drain_pending, "d2"),
            ]
            for call in calls:
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(call(), rnd.uniform(0.0001, 0.003))
                    returned += len(answer) if isinstance(answer, list) else 0
        started = time.monotonic()
        late = await store.enqueue("d3", b"late", 600)
        assert time.monotonic() - started < 2, "the enqueue waited for a lock"
        # Each cut write took effect or not, whole: a status that says which.
        for command_id in ids:
            assert await store.get_status(command_id) in (
                CommandStatus.PENDING,
                CommandStatus.CANCELLED,
            )
        returned += len(await store.drain_pending("d2"))
        statuses = [await store.get_status(command_id) for command_id in waiting]
        # Every confirmed command returned by exactly one drain; the rest still wait.
        assert returned == statuses.count(CommandStatus.DELIVERED)
        assert set(statuses) <= {CommandStatus.DELIVERED, CommandStatus.AWAITING_CONFIRMATION}
        assert await store.drain_pending("d3") == [b"late"]
        assert await store.get_status(late) is CommandStatus.DELIVERED


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "file"])
async def test_a_drain_cut_while_it_waits_its_turn_never_runs(url: str, tmp_path: Path) -> None:
    """Cut while other writes hold the SQLite writer, a drain ends at once and never runs:
    its commands are never read ``DELIVERED`` (it used to wait its turn, run, and give them
    back, and a reader in between met them delivered)."""
    if url == "file":
        url = f"sqlite+aiosqlite:///{tmp_path / 'turn.db'}"
    async with await SqlStore.connect(url) as store:
        command_id = await store.enqueue("d1", b"x", 600)
        async with store._writers:  # other writes hold the writer meanwhile
            drain = asyncio.ensure_future(store.drain_pending("d1"))
            await asyncio.sleep(0.05)
            drain.cancel()
            done, _ = await asyncio.wait([drain], timeout=2)
            assert done, "the cancelled drain waited for its turn"
        assert drain.cancelled()
        await asyncio.sleep(0.05)  # had it been left to run, it would have run by now
        assert await store.get_status(command_id) is CommandStatus.PENDING
        record = await store.get_command(command_id)
        assert record.claimed_until is None, "the cut drain ran and gave back"
        assert await store.drain_pending("d1") == [b"x"]
