"""A command a device took ends DELIVERED, even when its stream closed before the mark landed.

Seen in the Redis-restart fault trials (``python -m tests.faults --redis-restarts``, seed
486107278, a SIGTERM trial): a ``consume()`` stream handed a latest-wins command out, the
loop body finished, and Redis went down before the delivery mark landed. The stream's next
read failed (StateError), the gateway left the ``async with``, and the one more try at close
failed too: the message went back to the broker with the command still PENDING. Redis back,
a newer command of that type replaced it, and the next stream dropped the requeued message as
superseded: the command the device ran ended SUPERSEDED (a wrong status), although the mark
wins over a replacement, a cancel or an expiry (``rules.taken``). Had nothing replaced it, the
next stream handed it out a second time (the harness's duplicates in those trials).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, RabbitMQStore, mark_commits
from amqp_queue.state import IndexedStore, MemoryStore, StateError
from tests.rabbitmq_support import queue_depth, rabbitmq_store, store_on_index
from tests.support import eventually
from tests.test_adversarial_seams import BACKENDS, state_url_for
from tests.test_consume_acks import MarksFail


async def _ended_by(how: str, store: RabbitMQStore, command_id: str) -> str | None:
    """Ends the command as an operator or a producer would; returns the replacement's id."""
    if how == "cancel":
        await store.cancel_command(command_id)
        return None
    return await store.enqueue_or_update("dev-1", "setpoint", b"21.5", 600)


class FailingMarks:
    """Fails an index's delivery marks while ``down``, as an index that is down would,
    whatever its backend."""

    def __init__(self, state: IndexedStore) -> None:
        self.down = True
        self.failed: list[list[str]] = []
        self._mark = state.mark_delivered
        state.mark_delivered = self  # type: ignore[method-assign]

    async def __call__(self, command_ids: Collection[str]) -> int:
        if self.down:
            self.failed.append(list(command_ids))
            raise StateError("state index delivery mark failed: connection refused")
        return await self._mark(command_ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["replace", "cancel"])
async def test_a_command_taken_before_its_stream_closed_unmarked_ends_delivered(
    tmp_path: Path, how: str, backend: str
) -> None:
    async with (
        state_url_for(backend, tmp_path) as url,
        rabbitmq_store(tmp_path, state_url=url) as store,
    ):
        state = FailingMarks(store.state)  # the index down for marks
        taken = await store.enqueue_or_update("dev-1", "setpoint", b"20.0", 600)

        async with store.consume("dev-1") as stream:
            assert (await anext(stream)).id == taken
            # The device is done with it; the block ends, and so does every try of its mark.
        assert state.failed
        assert all(ids == [taken] for ids in state.failed)
        assert await store.get_status(taken) is CommandStatus.PENDING

        # Replaced or cancelled while the marks still fail (the store keeps trying them).
        newer = await _ended_by(how, store, taken)
        assert await store.get_status(taken) is not CommandStatus.DELIVERED
        state.down = False  # the index is back

        async def delivered() -> bool:
            return await store.get_status(taken) is CommandStatus.DELIVERED

        await eventually(delivered, 10)
        # The requeued message is dropped (delivered), never handed out again.
        assert await store.drain_pending("dev-1") == ([] if newer is None else [b"21.5"])
        assert await queue_depth(store, "dev-1") == 0


async def test_a_closing_store_lands_what_its_closed_streams_owe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is back before the store's next background try: the store's close tries
    the owed marks once more, rather than leaving the commands to come again."""
    monkeypatch.setattr(mark_commits, "OWED_RETRY_FIRST", 60.0)
    state = MarksFail(tmp_path / "state.db", failures=10**6)
    async with store_on_index(state) as store:
        command_id = await store.enqueue("dev-1", b"x", 600)
        async with store.consume("dev-1") as stream:
            assert (await anext(stream)).id == command_id
        assert await store.get_status(command_id) is CommandStatus.PENDING
        state.failures = 0

        await store.close()

        assert await state.get_status(command_id) is CommandStatus.DELIVERED


async def test_a_stream_whose_close_is_cancelled_still_hands_over_its_unlanded_marks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's shutdown cancels the stream's close while its last mark hangs: the mark
    is the store's to land all the same. (Found by a review.)"""
    monkeypatch.setattr(mark_commits, "OWED_RETRY_FIRST", 60.0)
    state = MarksHang(tmp_path / "state.db")
    async with store_on_index(state) as store:
        command_id = await store.enqueue("dev-1", b"x", 600)
        stream = store.consume("dev-1")
        await stream.__aenter__()
        assert (await anext(stream)).id == command_id
        closing = asyncio.ensure_future(stream.__aexit__(None, None, None))
        await asyncio.wait_for(state.hanging.wait(), 5)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        state.answering.set()

        await store.close()  # the owed mark's last try

        assert await state.get_status(command_id) is CommandStatus.DELIVERED


class MarksHang(MarksFail):
    """Delivery marks wait until released, then fail: an index that stopped answering."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, failures=1)
        self.hanging = asyncio.Event()
        self.answering = asyncio.Event()

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        if not self.answering.is_set():
            self.hanging.set()
            await self.answering.wait()
        return await super().mark_delivered(command_ids)


class RefusesSome(MemoryStore):
    """An index that refuses marks of the ``refused`` commands (as a row it cannot write
    would) and takes every other mark."""

    def __init__(self, refused: set[str]) -> None:
        super().__init__()
        self.refused = refused
        self.refusals = 0

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        if self.refused & set(command_ids):
            self.refusals += 1
            raise StateError("state index delivery mark failed")
        return await super().mark_delivered(command_ids)


async def test_owed_marks_the_index_refuses_are_not_retried_each_time_another_mark_lands() -> None:
    # A review: every landed mark wakes the owed marks' retry at once, with no floor, so
    # owed marks the index keeps refusing were tried (and logged) once per other commit.
    state = RefusesSome({"owed"})
    commits = mark_commits.MarkCommits(state)
    commits.owe(["owed"])
    began = time.monotonic()
    for n in range(40):  # others' marks landing every 25 ms for about a second
        with contextlib.suppress(StateError):  # refused too when it shares a commit
            await commits.mark_delivered([f"other-{n}"])
        await asyncio.sleep(0.025)
    commits.halt()
    took = time.monotonic() - began  # longer under load (6 tries in the test command once)

    # Backing off from OWED_RETRY_FIRST: 0.25, 0.5 s... at most one try per 0.25 s (the old
    # code: one per other commit, 40).
    assert 1 <= state.refusals <= took / mark_commits.OWED_RETRY_FIRST + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reader", ["consume", "drain"])
async def test_a_command_a_closed_stream_owes_a_mark_for_is_not_handed_out_again(
    tmp_path: Path, backend: str, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A known limit until now: the index back before the store's next try of the owed
    marks, a new stream (or drain) of the same store read the requeued message, found the
    command still PENDING and handed it out a second time."""
    monkeypatch.setattr(mark_commits, "OWED_RETRY_FIRST", 60.0)  # no background try first
    async with (
        state_url_for(backend, tmp_path) as url,
        rabbitmq_store(tmp_path, state_url=url) as store,
    ):
        marks = FailingMarks(store.state)
        taken = await store.enqueue("dev-1", b"taken", 600)
        async with store.consume("dev-1") as stream:
            assert (await anext(stream)).id == taken
        assert marks.failed
        marks.down = False  # the index is back; the requeued message waits in the queue
        await store.enqueue("dev-1", b"newer", 600)

        if reader == "consume":
            async with store.consume("dev-1") as stream:
                got = [(await anext(stream)).payload]
        else:
            got = await store.drain_pending("dev-1")

        assert got == [b"newer"]
        assert await store.get_status(taken) is CommandStatus.DELIVERED


class CountsMarks(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.marked: list[list[str]] = []

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        self.marked.append(list(command_ids))
        await asyncio.sleep(0.01)
        return await super().mark_delivered(command_ids)


async def test_streams_reading_owed_commands_land_only_those(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A review: each stream landed every owed mark of the store, so a fleet's streams back
    # after an outage landed the same thousands of marks once per stream.
    monkeypatch.setattr(mark_commits, "OWED_RETRY_FIRST", 60.0)  # no background try
    state = CountsMarks()
    commits = mark_commits.MarkCommits(state)
    owed = {d: [f"{d}-c{n}" for n in range(10)] for d in (f"dev-{i}" for i in range(200))}
    commits.owe([command_id for ids in owed.values() for command_id in ids])
    await asyncio.gather(*(commits.land_owed_among(ids) for ids in owed.values()))
    commits.halt()

    # The streams' own, and at most one background commit woken by the first of theirs.
    assert sum(len(ids) for ids in state.marked) <= 2_000 + mark_commits.OWED_PER_COMMIT


async def test_a_mark_the_index_refuses_does_not_fail_other_devices_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A review: a window with one owed command landed every owed mark, in order, so one
    # the index kept refusing (another device's) failed that window's read each time.
    monkeypatch.setattr(mark_commits, "OWED_RETRY_FIRST", 60.0)  # no background try
    state = RefusesSome({"x1"})
    commits = mark_commits.MarkCommits(state)
    commits.owe(["x1", "y1"])
    await commits.land_owed_among(["y1", "y2"])  # device y's window: no StateError
    commits.halt()

    assert state.refusals == 0  # x1's mark was not tried with y's window
