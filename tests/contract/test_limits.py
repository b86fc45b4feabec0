"""Rule 11: a device holds at most ``max_pending_per_device`` open commands; QueueFull
writes nothing; a replacement is not an addition; the check holds under concurrency."""

from __future__ import annotations

import asyncio

import pytest

from amqp_queue import Limits, QueueError, QueueFull
from amqp_queue.state import CommandStatus
from tests.backends import commands_held
from tests.conftest import OpenStore
from tests.support import FakeClock


async def test_an_enqueue_over_the_limit_raises_queue_full_and_writes_nothing(
    open_store: OpenStore,
) -> None:
    async with open_store(limits=Limits(max_pending_per_device=3)) as store:
        for n in range(3):
            await store.enqueue("dev-1", bytes([n]), 60)
        held = await commands_held(store)

        with pytest.raises(QueueFull) as raised:
            await store.enqueue("dev-1", b"four", 60)
        with pytest.raises(QueueFull):
            await store.enqueue_with_confirmation("dev-1", "t", b"four", 60)

        assert isinstance(raised.value, QueueError)
        assert (raised.value.device_id, raised.value.limit) == ("dev-1", 3)
        assert "3" in str(raised.value)
        assert await commands_held(store) == held
        assert len(await store.get_pending("dev-1")) == 3
        assert await store.enqueue("dev-2", b"other device", 60)


async def test_a_replacement_at_the_limit_is_not_an_addition(open_store: OpenStore) -> None:
    async with open_store(limits=Limits(max_pending_per_device=2)) as store:
        await store.enqueue("dev-1", b"plain", 60)
        first = await store.enqueue_or_update("dev-1", "t", b"v1", 60)

        second = await store.enqueue_or_update("dev-1", "t", b"v2", 60)
        third = await store.enqueue_with_confirmation("dev-1", "t", b"v3", 60)

        assert await store.get_status(first) == CommandStatus.SUPERSEDED
        assert await store.get_status(second) == CommandStatus.SUPERSEDED
        assert await store.get_status(third) == CommandStatus.AWAITING_CONFIRMATION
        with pytest.raises(QueueFull):
            await store.enqueue_or_update("dev-1", "other-type", b"x", 60)


async def test_delivered_cancelled_and_expired_commands_free_their_place(
    open_store: OpenStore, clock: FakeClock
) -> None:
    async with open_store(limits=Limits(max_pending_per_device=2)) as store:
        await store.enqueue("dev-1", b"a", 60)
        cancelled = await store.enqueue("dev-1", b"b", 60)
        await store.cancel_command(cancelled)
        await store.enqueue("dev-1", b"short", 5)
        with pytest.raises(QueueFull):
            await store.enqueue("dev-1", b"c", 60)

        clock.advance(10)  # `short` expired, not yet swept by cleanup
        await store.enqueue("dev-1", b"c", 60)
        assert await store.drain_pending("dev-1") == [b"a", b"c"]
        await store.enqueue("dev-1", b"d", 60)
        await store.enqueue("dev-1", b"e", 60)


async def test_fifty_concurrent_producers_never_take_a_device_over_its_limit(
    open_store: OpenStore,
) -> None:
    async with open_store(limits=Limits(max_pending_per_device=20)) as store:
        results = await asyncio.gather(
            *(store.enqueue("dev-1", bytes([n]), 60) for n in range(50)),
            return_exceptions=True,
        )

        refused = [result for result in results if isinstance(result, BaseException)]
        accepted = [result for result in results if isinstance(result, str)]
        assert all(isinstance(error, QueueFull) for error in refused), refused
        assert len(accepted) == 20
        assert len(refused) == 30
        assert sorted(command.id for command in await store.get_pending("dev-1")) == sorted(
            accepted
        )


async def test_the_default_limit_is_documented_and_positive() -> None:
    assert Limits().max_pending_per_device == 1000
    with pytest.raises(ValueError, match="at least 1"):
        Limits(max_pending_per_device=0)
