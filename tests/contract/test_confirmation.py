"""Rule 4: confirmation commands are delivered only after confirm_command."""

from __future__ import annotations

import pytest

from amqp_queue.state import CommandExpired, CommandStatus, Store
from tests.support import FakeClock


async def test_confirmation_command_waits_for_confirm(store: Store) -> None:
    command_id = await store.enqueue_with_confirmation("dev-1", "unlock", b"open", 60)

    [waiting] = await store.get_pending_confirmations("dev-1")
    assert waiting.id == command_id
    assert (waiting.requires_confirmation, waiting.confirmed) == (True, False)
    assert await store.get_status(command_id) == CommandStatus.AWAITING_CONFIRMATION
    assert await store.drain_pending("dev-1") == []

    await store.confirm_command(command_id)

    assert await store.get_pending_confirmations("dev-1") == []
    [pending] = await store.get_pending("dev-1")
    assert (pending.requires_confirmation, pending.confirmed) == (True, True)
    assert await store.get_status(command_id) == CommandStatus.PENDING
    assert await store.drain_pending("dev-1") == [b"open"]


async def test_confirming_twice_is_harmless(store: Store) -> None:
    command_id = await store.enqueue_with_confirmation("dev-1", "unlock", b"open", 60)

    await store.confirm_command(command_id)
    await store.confirm_command(command_id)

    assert await store.drain_pending("dev-1") == [b"open"]
    await store.confirm_command(command_id)
    assert await store.get_status(command_id) == CommandStatus.DELIVERED
    assert await store.drain_pending("dev-1") == []


async def test_confirming_an_expired_command_raises_command_expired(
    store: Store, clock: FakeClock
) -> None:
    command_id = await store.enqueue_with_confirmation("dev-1", "unlock", b"open", 5)
    clock.advance(5)

    with pytest.raises(CommandExpired):
        await store.confirm_command(command_id)
    assert await store.get_status(command_id) == CommandStatus.EXPIRED
    assert await store.drain_pending("dev-1") == []


async def test_pending_confirmations_leave_out_expired_ones(store: Store, clock: FakeClock) -> None:
    await store.enqueue_with_confirmation("dev-1", "unlock", b"a", 5)
    kept = await store.enqueue_with_confirmation("dev-1", "lock", b"b", 60)
    clock.advance(10)

    assert [c.id for c in await store.get_pending_confirmations("dev-1")] == [kept]
