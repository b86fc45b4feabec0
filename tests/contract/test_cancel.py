"""Rule 5: a cancelled command is never delivered; only live commands can be cancelled."""

from __future__ import annotations

import pytest

from amqp_queue.state import CommandExpired, CommandNotFound, CommandStatus, Store
from tests.support import FakeClock


async def test_cancelled_command_is_never_delivered_nor_pending(store: Store) -> None:
    cancelled = await store.enqueue("dev-1", b"no", 60)
    kept = await store.enqueue("dev-1", b"yes", 60)

    await store.cancel_command(cancelled)

    assert [c.id for c in await store.get_pending("dev-1")] == [kept]
    assert await store.drain_pending("dev-1") == [b"yes"]
    assert await store.get_status(cancelled) == CommandStatus.CANCELLED


async def test_cancelling_a_confirmation_command(store: Store) -> None:
    command_id = await store.enqueue_with_confirmation("dev-1", "unlock", b"open", 60)

    await store.cancel_command(command_id)

    assert await store.get_pending_confirmations("dev-1") == []
    with pytest.raises(CommandNotFound):
        await store.confirm_command(command_id)


async def test_cancel_frees_the_type_for_a_new_command(store: Store) -> None:
    first = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
    await store.cancel_command(first)
    await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)

    assert await store.get_status(first) == CommandStatus.CANCELLED
    assert await store.drain_pending("dev-1") == [b"21"]


@pytest.mark.parametrize("command_id", ["6f1c2c1e-0000-4000-8000-000000000001", "not-a-uuid", ""])
async def test_cancelling_an_unknown_id_raises_command_not_found(
    store: Store, command_id: str
) -> None:
    with pytest.raises(CommandNotFound):
        await store.cancel_command(command_id)


async def test_cancelling_a_delivered_command_raises_command_not_found(store: Store) -> None:
    command_id = await store.enqueue("dev-1", b"x", 60)
    await store.drain_pending("dev-1")

    with pytest.raises(CommandNotFound):
        await store.cancel_command(command_id)
    assert await store.get_status(command_id) == CommandStatus.DELIVERED


async def test_cancelling_twice_raises_command_not_found(store: Store) -> None:
    command_id = await store.enqueue("dev-1", b"x", 60)
    await store.cancel_command(command_id)

    with pytest.raises(CommandNotFound):
        await store.cancel_command(command_id)


async def test_cancelling_an_expired_command_raises(store: Store, clock: FakeClock) -> None:
    command_id = await store.enqueue("dev-1", b"x", 5)
    clock.advance(6)

    with pytest.raises(CommandExpired):
        await store.cancel_command(command_id)
    assert await store.get_status(command_id) == CommandStatus.EXPIRED
