"""A cancelled drain gives back what it claimed even when the index refuses for a while.

What a call claimed but could not hand over goes back, never to DELIVERED (DESIGN). The
give-back's release used to be tried once: refused by a transient index error, the claimed
commands stayed DELIVERED, their requeued messages were dropped as stale by the next reader,
and the device never got them. It is now tried again for ``publish_timeout`` seconds while
the drain's messages wait unacked; past that, the outbox relay gives them back, published
again, once the index takes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, RabbitMQStore, StateError
from amqp_queue.state import RedisStore, SqlStore
from amqp_queue.state.model import CommandRecord
from tests.backends import POSTGRES_URL, REDIS_URL, postgres_schema, redis_prefix
from tests.rabbitmq_support import store_over
from tests.redis_faults import LosesReplies


class RefusesReleases(SqlStore):
    """The real SQL index; a claim answers 0.5 s after it committed (so the drain can be
    cancelled holding it), and ``refusals`` releases fail before reaching the database, or
    every release for ``refuse_for`` seconds from the first."""

    refusals = 0
    refuse_for = 0.0
    _refusing_until: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed = asyncio.Event()

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        records = await super().claim(device_id, command_ids)
        if records:
            self.claimed.set()
            await asyncio.sleep(0.5)
        return records

    async def release(
        self, requeued: Sequence[CommandRecord], republish: Sequence[CommandRecord]
    ) -> int:
        now = asyncio.get_running_loop().time()
        if self.refuse_for and self._refusing_until is None:
            self._refusing_until = now + self.refuse_for
        if self.refusals > 0 or (self._refusing_until is not None and now < self._refusing_until):
            self.refusals = max(0, self.refusals - 1)
            raise StateError("state index write failed: connection refused (injected)")
        return await super().release(requeued, republish)


@asynccontextmanager
async def sql_index(kind: str, tmp_path: Path) -> AsyncIterator[RefusesReleases]:
    if kind == "sqlite":
        store = await RefusesReleases.connect(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
        try:
            yield store  # type: ignore[misc]
        finally:
            await store.close()
        return
    async with postgres_schema() as schema:
        store = await RefusesReleases.connect(POSTGRES_URL, schema=schema)
        try:
            yield store  # type: ignore[misc]
        finally:
            await store.close()


async def cancel_a_drain_holding_its_claim(store: RabbitMQStore, claimed: asyncio.Event) -> None:
    draining = asyncio.create_task(store.drain_pending("dev-1"))
    await asyncio.wait_for(claimed.wait(), 10)
    draining.cancel()
    with pytest.raises(asyncio.CancelledError):
        await draining


async def _consume(store: RabbitMQStore, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with store.consume("dev-1") as stream:
        async for command in stream:
            got.append(command.payload)
            if len(got) == count:
                break
    return got


PAYLOADS = [f"c{n}".encode() for n in range(3)]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_give_back_refused_twice_is_tried_again_and_keeps_the_order(
    kind: str, tmp_path: Path
) -> None:
    async with sql_index(kind, tmp_path) as state, store_over(state) as store:
        ids = [await store.enqueue("dev-1", payload, 600) for payload in PAYLOADS]
        state.refusals = 2
        await cancel_a_drain_holding_its_claim(store, state.claimed)

        assert [await store.get_status(i) for i in ids] == [CommandStatus.PENDING] * 3
        assert await asyncio.wait_for(_consume(store, 3), 10) == PAYLOADS
        assert state.refusals == 0


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_give_back_refused_past_its_bound_is_finished_by_the_relay(
    kind: str, tmp_path: Path
) -> None:
    async with (
        sql_index(kind, tmp_path) as state,
        store_over(state, publish_timeout=0.5, relay_interval=0.2) as store,
    ):
        ids = [await store.enqueue("dev-1", payload, 600) for payload in PAYLOADS]
        # Longer than the drain's half second of tries: the relay's retries take the rest.
        state.refuse_for = 2.0
        await cancel_a_drain_holding_its_claim(store, state.claimed)

        got = await asyncio.wait_for(_consume(store, 3), 30)

        assert sorted(got) == PAYLOADS
        assert [await store.get_status(i) for i in ids] == [CommandStatus.DELIVERED] * 3


class _Refusing(LosesReplies):
    pass


class _SlowClaims(RedisStore):
    """The real Redis store; each claim answers a moment after it landed."""

    claimed: asyncio.Event

    async def _claim(self, device_id: str, now: Any, command_ids: Any) -> list[CommandRecord]:
        records = await super()._claim(device_id, now, command_ids)
        if records:
            self.claimed.set()
            await asyncio.sleep(0.5)
        return records


async def test_a_give_back_whose_redis_connection_is_refused_once_loses_nothing() -> None:
    """The release script's connection is refused once (a transient Redis error)."""
    async with redis_prefix() as prefix:
        state = await _SlowClaims.connect(REDIS_URL, prefix=prefix, connection_class=_Refusing)
        assert isinstance(state, _SlowClaims)
        state.claimed = asyncio.Event()
        try:
            async with store_over(state) as store:
                ids = [await store.enqueue("dev-1", payload, 600) for payload in PAYLOADS]
                _Refusing.only = state._release_script.sha.encode()
                _Refusing.refuse = 1
                await cancel_a_drain_holding_its_claim(store, state.claimed)
                _Refusing.refuse = 0
                _Refusing.only = None

                assert await asyncio.wait_for(_consume(store, 3), 10) == PAYLOADS
                assert [await store.get_status(i) for i in ids] == [CommandStatus.DELIVERED] * 3
        finally:
            _Refusing.refuse = 0
            _Refusing.only = None
            await state.close()


async def test_a_give_back_the_index_keeps_refusing_does_not_hold_up_other_devices(
    tmp_path: Path,
) -> None:
    async with (
        sql_index("sqlite", tmp_path) as state,
        store_over(state, publish_timeout=0.5, relay_interval=0.2) as store,
    ):
        for payload in PAYLOADS:
            await store.enqueue("dev-1", payload, 600)
        state.refuse_for = 4.0
        await cancel_a_drain_holding_its_claim(store, state.claimed)

        await store.enqueue("dev-2", b"other", 600)
        async with store.consume("dev-2") as stream:
            command = await asyncio.wait_for(stream.__anext__(), 2.5)

        assert command.payload == b"other"
        assert sorted(await asyncio.wait_for(_consume(store, 3), 30)) == PAYLOADS
