"""Rule 3: latest intent wins, and a replacement never inherits an approval."""

from __future__ import annotations

import asyncio

import pytest

from amqp_queue.state import CommandNotFound, CommandStatus, IndexedStore, Store
from tests.conftest import OpenStore
from tests.support import FakeClock


async def test_enqueue_or_update_replaces_the_undelivered_command_of_its_type(store: Store) -> None:
    old = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
    new = await store.enqueue_or_update("dev-1", "setpoint", b"22", 60)

    assert new != old
    assert [c.id for c in await store.get_pending("dev-1")] == [new]
    assert await store.get_status(old) == CommandStatus.SUPERSEDED
    assert await store.drain_pending("dev-1") == [b"22"]


async def test_superseded_command_can_be_neither_confirmed_nor_cancelled(store: Store) -> None:
    old = await store.enqueue_with_confirmation("dev-1", "unlock", b"a", 60)
    await store.enqueue_with_confirmation("dev-1", "unlock", b"b", 60)

    with pytest.raises(CommandNotFound):
        await store.confirm_command(old)
    with pytest.raises(CommandNotFound):
        await store.cancel_command(old)
    assert await store.get_status(old) == CommandStatus.SUPERSEDED


async def test_superseded_payload_is_never_delivered(store: Store) -> None:
    for value in range(5):
        await store.enqueue_or_update("dev-1", "setpoint", str(value).encode(), 60)

    assert await store.drain_pending("dev-1") == [b"4"]


async def test_replacement_does_not_touch_other_types_devices_or_plain_commands(
    store: Store,
) -> None:
    plain = await store.enqueue("dev-1", b"plain", 60)
    other_type = await store.enqueue_or_update("dev-1", "mode", b"eco", 60)
    other_device = await store.enqueue_or_update("dev-2", "setpoint", b"18", 60)
    await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
    latest = await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)

    assert [c.id for c in await store.get_pending("dev-1")] == [plain, other_type, latest]
    assert [c.id for c in await store.get_pending("dev-2")] == [other_device]


async def test_replacement_of_a_confirmed_command_needs_its_own_confirmation(store: Store) -> None:
    approved = await store.enqueue_with_confirmation("dev-1", "unlock", b"door-1", 60)
    await store.confirm_command(approved)
    changed = await store.enqueue_with_confirmation("dev-1", "unlock", b"door-2", 60)

    assert await store.get_status(changed) == CommandStatus.AWAITING_CONFIRMATION
    assert await store.drain_pending("dev-1") == []

    await store.confirm_command(changed)
    assert await store.drain_pending("dev-1") == [b"door-2"]


async def test_plain_replacement_of_a_confirmation_command_is_ready(store: Store) -> None:
    waiting = await store.enqueue_with_confirmation("dev-1", "unlock", b"ask", 60)
    ready = await store.enqueue_or_update("dev-1", "unlock", b"now", 60)

    assert await store.get_status(waiting) == CommandStatus.SUPERSEDED
    assert await store.get_status(ready) == CommandStatus.PENDING
    assert await store.drain_pending("dev-1") == [b"now"]


async def test_confirmation_replacement_of_a_ready_command_waits(store: Store) -> None:
    await store.enqueue_or_update("dev-1", "unlock", b"ready", 60)
    waiting = await store.enqueue_with_confirmation("dev-1", "unlock", b"ask", 60)

    assert await store.drain_pending("dev-1") == []
    assert [c.id for c in await store.get_pending_confirmations("dev-1")] == [waiting]


async def test_a_delivered_command_is_not_replaced(store: Store) -> None:
    first = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
    assert await store.drain_pending("dev-1") == [b"20"]
    second = await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)

    assert await store.get_status(first) == CommandStatus.DELIVERED
    assert await store.get_status(second) == CommandStatus.PENDING


async def test_replacing_an_expired_command_leaves_it_expired(
    store: Store, clock: FakeClock
) -> None:
    old = await store.enqueue_or_update("dev-1", "setpoint", b"20", 5)
    clock.advance(6)
    await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)

    assert await store.get_status(old) == CommandStatus.EXPIRED
    assert await store.drain_pending("dev-1") == [b"21"]


async def test_concurrent_replacements_leave_exactly_one_live_command(store: Store) -> None:
    ids = await asyncio.gather(
        *(store.enqueue_or_update("dev-1", "setpoint", str(n).encode(), 60) for n in range(50))
    )

    [live] = await store.get_pending("dev-1")
    assert live.id in ids
    statuses = [await store.get_status(command_id) for command_id in ids]
    assert statuses.count(CommandStatus.PENDING) == 1
    assert statuses.count(CommandStatus.SUPERSEDED) == 49
    assert await store.drain_pending("dev-1") == [live.payload]


async def test_add_counts_the_commands_it_superseded(open_store: OpenStore) -> None:
    async with open_store() as store:
        state = getattr(store, "state", store)
        assert isinstance(state, IndexedStore)
        first = state.build("dev-1", "setpoint", b"1", 60, requires_confirmation=False)
        second = state.build("dev-1", "setpoint", b"2", 60, requires_confirmation=False)
        plain = state.build("dev-1", None, b"3", 60, requires_confirmation=False)

        assert await state.add([first]) == 0
        assert await state.add([second, plain]) == 1
