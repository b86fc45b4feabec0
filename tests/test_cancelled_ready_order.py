"""Ready order per device holds when the call that made commands ready is cancelled after
its write committed but before its answer came (DESIGN: published "in ready order per
device, also when the enqueuing call is cancelled"): a fan-out, a rollout's confirmation
and one confirmation, each written outside the group commit of plain enqueues.

The index is the real SQLite store; the write answers a moment after it committed, where a
cancellation of the caller lands, as it may at any await.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from amqp_queue import RabbitMQStore, StateError
from amqp_queue.fleet import FAN_OUT_IN_FLIGHT
from amqp_queue.state import SqlStore
from amqp_queue.state.model import CommandRecord
from tests.rabbitmq_support import store_on_index


class AnswersLate(SqlStore):
    """Writes and confirmations commit, then answer 0.3 s later while ``late`` is set."""

    late = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed = asyncio.Event()

    async def _after_commit(self) -> None:
        if self.late:
            self.committed.set()
            await asyncio.sleep(0.3)

    # Set: the next write of new commands commits, then raises as a lost COMMIT answer the
    # index could not settle does.
    unknown = False

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        superseded = await super().write(records, published)
        if records:
            await self._after_commit()
            if self.unknown:
                self.unknown = False
                raise StateError("state index write failed; its outcome is unknown (injected)")
        return superseded

    async def confirm_changed(
        self, command_id: str, *, by: str | None = None
    ) -> tuple[CommandRecord, bool]:
        confirmed = await super().confirm_changed(command_id, by=by)
        await self._after_commit()
        return confirmed

    async def confirm_members(
        self, rollout_id: str, *, by: str | None = None
    ) -> list[CommandRecord]:
        confirmed = await super().confirm_members(rollout_id, by=by)
        await self._after_commit()
        return confirmed


async def _received(store: RabbitMQStore, device: str, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with store.consume(device) as stream:
        async for command in stream:
            got.append(command.payload)
            if len(got) == count:
                break
    return got


async def _cancelled_then_later(
    tmp_path: Path,
    prepare: Callable[[RabbitMQStore], Awaitable[Callable[[], Coroutine[Any, Any, Any]]]],
) -> list[bytes]:
    """Runs the call ``prepare`` returns, cancels it once its write committed, enqueues
    ``later`` to the device, and returns what the device receives."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    state = AnswersLate(engine)
    # A long relay lease: the cancelled call's commands must not wait for an orphan sweep.
    async with store_on_index(state, relay_after=30.0, relay_interval=0.2) as store:
        await store.ensure_queue("dev-m")
        call = await prepare(store)
        state.late = True
        calling: asyncio.Task[Any] = asyncio.create_task(call())
        await asyncio.wait_for(state.committed.wait(), 10)
        calling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await calling
        state.late = False
        await store.enqueue("dev-m", b"later", 600)
        return await asyncio.wait_for(_received(store, "dev-m", 2), 10)


async def test_a_fan_out_cancelled_after_its_write_is_not_overtaken(tmp_path: Path) -> None:
    async def prepare(store: RabbitMQStore) -> Callable[[], Coroutine[Any, Any, Any]]:
        return lambda: store.enqueue_many(["dev-m", "dev-n"], b"first", 600)

    assert await _cancelled_then_later(tmp_path, prepare) == [b"first", b"later"]


async def test_a_confirmation_cancelled_after_its_write_is_not_overtaken(tmp_path: Path) -> None:
    async def prepare(store: RabbitMQStore) -> Callable[[], Coroutine[Any, Any, Any]]:
        command_id = await store.enqueue_with_confirmation("dev-m", "mode", b"first", 600)
        return lambda: store.confirm_command(command_id)

    assert await _cancelled_then_later(tmp_path, prepare) == [b"first", b"later"]


async def test_a_rollout_confirmation_cancelled_after_its_write_is_not_overtaken(
    tmp_path: Path,
) -> None:
    async def prepare(store: RabbitMQStore) -> Callable[[], Coroutine[Any, Any, Any]]:
        rollout = await store.enqueue_many(
            ["dev-m", "dev-n"], b"first", 600, command_type="mode", requires_confirmation=True
        )
        return lambda: store.confirm_rollout(rollout.rollout_id)

    assert await _cancelled_then_later(tmp_path, prepare) == [b"first", b"later"]


async def test_a_command_enqueued_during_a_large_fan_out_comes_after_it(tmp_path: Path) -> None:
    """Past FAN_OUT_IN_FLIGHT devices a fan-out's publishes waited their turn, and a command
    enqueued meanwhile to one of the last devices was published ahead of its fan-out
    command."""
    devices = [f"dev-{n:05}" for n in range(FAN_OUT_IN_FLIGHT + 200)]
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    state = AnswersLate(engine)
    async with store_on_index(state) as store:
        state.late = True
        fanning = asyncio.create_task(store.enqueue_many(devices, b"first", 600))
        await asyncio.wait_for(state.committed.wait(), 20)
        state.late = False
        await store.enqueue(devices[-1], b"later", 600)
        await asyncio.wait_for(fanning, 60)

        assert await asyncio.wait_for(_received(store, devices[-1], 2), 20) == [
            b"first",
            b"later",
        ]


async def test_a_fan_out_whose_write_outcome_is_unknown_is_owed_to_the_relay(
    tmp_path: Path,
) -> None:
    """Written though the call raised: published by this process's relay at once, not left
    for the orphan sweep after the relay lease (30 s here)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    state = AnswersLate(engine)
    async with store_on_index(state, relay_after=30.0, relay_interval=0.2) as store:
        state.unknown = True
        with pytest.raises(StateError):
            await store.enqueue_many(["dev-m", "dev-n"], b"first", 600)
        await store.enqueue("dev-m", b"later", 600)

        assert await asyncio.wait_for(_received(store, "dev-m", 2), 10) == [b"first", b"later"]
