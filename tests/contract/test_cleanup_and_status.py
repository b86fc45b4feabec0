"""Rules 6 and 8: cleanup removes expired commands and prunes old ones; status tells the truth."""

from __future__ import annotations

from datetime import timedelta

import pytest

from amqp_queue.state import CommandNotFound, CommandStatus, Store
from tests.conftest import OpenStore
from tests.support import FakeClock


async def test_cleanup_removes_expired_commands_and_counts_them(
    store: Store, clock: FakeClock
) -> None:
    expired = [await store.enqueue(f"dev-{n}", b"x", 5) for n in range(3)]
    live = await store.enqueue("dev-0", b"live", 600)
    clock.advance(10)

    assert await store.cleanup() == 3
    assert await store.cleanup() == 0
    assert [await store.get_status(command_id) for command_id in expired] == [
        CommandStatus.EXPIRED
    ] * 3
    assert await store.get_status(live) == CommandStatus.PENDING


async def test_cleanup_prunes_finished_commands_after_the_retention(
    open_store: OpenStore, clock: FakeClock
) -> None:
    async with open_store(retention=timedelta(hours=1)) as store:
        delivered = await store.enqueue("dev-1", b"d", 60)
        await store.drain_pending("dev-1")
        cancelled = await store.enqueue("dev-1", b"c", 60)
        await store.cancel_command(cancelled)
        superseded = await store.enqueue_or_update("dev-1", "t", b"s1", 60)
        await store.enqueue_or_update("dev-1", "t", b"s2", 60)
        expired = await store.enqueue("dev-1", b"e", 30)
        clock.advance(31)
        assert await store.cleanup() == 1  # `e`; the replacement `s2` lives on

        clock.advance(30 * 60)
        await store.cleanup()
        assert await store.get_status(delivered) == CommandStatus.DELIVERED
        assert await store.get_status(expired) == CommandStatus.EXPIRED

        clock.advance(31 * 60)
        assert await store.cleanup() == 0
        for command_id in (delivered, cancelled, superseded, expired):
            with pytest.raises(CommandNotFound):
                await store.get_status(command_id)


async def test_cleanup_keeps_live_commands_however_old(
    open_store: OpenStore, clock: FakeClock
) -> None:
    async with open_store(retention=timedelta(0)) as store:
        live = await store.enqueue("dev-1", b"x", timedelta(days=2))
        clock.advance(timedelta(days=1).total_seconds())

        assert await store.cleanup() == 0
        assert await store.get_status(live) == CommandStatus.PENDING


async def test_status_walks_through_the_lifecycle(store: Store, clock: FakeClock) -> None:
    command_id = await store.enqueue_with_confirmation("dev-1", "unlock", b"x", 60)
    assert await store.get_status(command_id) == CommandStatus.AWAITING_CONFIRMATION
    await store.confirm_command(command_id)
    assert await store.get_status(command_id) == CommandStatus.PENDING
    await store.drain_pending("dev-1")
    assert await store.get_status(command_id) == CommandStatus.DELIVERED


async def test_status_of_an_expired_command_before_cleanup(store: Store, clock: FakeClock) -> None:
    command_id = await store.enqueue("dev-1", b"x", 5)
    clock.advance(5)

    assert await store.get_status(command_id) == CommandStatus.EXPIRED


@pytest.mark.parametrize("command_id", ["6f1c2c1e-0000-4000-8000-000000000002", "nope", ""])
async def test_status_of_an_unknown_id_raises_command_not_found(
    store: Store, command_id: str
) -> None:
    with pytest.raises(CommandNotFound):
        await store.get_status(command_id)


async def test_status_is_a_str_enum(store: Store) -> None:
    command_id = await store.enqueue("dev-1", b"x", 60)

    status = await store.get_status(command_id)

    assert status == "pending"
    assert isinstance(status, str)
