"""Rule 1: get_pending lists every unexpired, undelivered command, oldest write first."""

from __future__ import annotations

import uuid
from datetime import timedelta

from amqp_queue.state import CommandStatus, Store
from tests.support import FakeClock


async def test_enqueue_returns_a_uuid_and_the_command_is_pending(store: Store) -> None:
    command_id = await store.enqueue("dev-1", b"reboot", 60)

    assert str(uuid.UUID(command_id)) == command_id
    assert await store.get_status(command_id) == CommandStatus.PENDING


async def test_pending_command_carries_its_fields(store: Store, clock: FakeClock) -> None:
    command_id = await store.enqueue_or_update("dev-1", "setpoint", b"21.5", timedelta(minutes=5))

    [pending] = await store.get_pending("dev-1")

    assert pending.id == command_id
    assert pending.device_id == "dev-1"
    assert pending.command_type == "setpoint"
    assert pending.payload == b"21.5"
    assert (pending.requires_confirmation, pending.confirmed) == (False, False)
    assert pending.created_at == clock.now
    assert pending.expires_at == clock.now + timedelta(minutes=5)
    assert pending.created_at.utcoffset() == timedelta(0)


async def test_plain_enqueue_has_no_command_type(store: Store) -> None:
    await store.enqueue("dev-1", b"x", 60)

    [pending] = await store.get_pending("dev-1")

    assert pending.command_type is None


async def test_get_pending_lists_oldest_write_first_including_unconfirmed(store: Store) -> None:
    first = await store.enqueue("dev-1", b"1", 60)
    second = await store.enqueue_with_confirmation("dev-1", "unlock", b"2", 60)
    third = await store.enqueue_or_update("dev-1", "setpoint", b"3", 60)

    pending = await store.get_pending("dev-1")

    assert [command.id for command in pending] == [first, second, third]


async def test_get_pending_changes_nothing(store: Store) -> None:
    await store.enqueue("dev-1", b"1", 60)

    assert len(await store.get_pending("dev-1")) == 1
    assert len(await store.get_pending("dev-1")) == 1
    assert await store.drain_pending("dev-1") == [b"1"]


async def test_get_pending_leaves_out_expired_and_delivered(store: Store, clock: FakeClock) -> None:
    await store.enqueue("dev-1", b"short", 10)
    await store.enqueue("dev-1", b"delivered", 60)
    await store.drain_pending("dev-1")
    kept = await store.enqueue("dev-1", b"long", 600)

    clock.advance(11)

    assert [command.id for command in await store.get_pending("dev-1")] == [kept]


async def test_devices_are_separate(store: Store) -> None:
    await store.enqueue("dev-1", b"a", 60)
    await store.enqueue("dev-2", b"b", 60)

    assert [c.payload for c in await store.get_pending("dev-1")] == [b"a"]
    assert await store.drain_pending("dev-2") == [b"b"]
    assert await store.get_pending("dev-3") == []


async def test_ttl_may_be_a_timedelta_or_seconds(store: Store, clock: FakeClock) -> None:
    await store.enqueue("dev-1", b"a", timedelta(seconds=30))
    await store.enqueue("dev-1", b"b", 30.5)

    expiries = [command.expires_at - clock.now for command in await store.get_pending("dev-1")]

    assert expiries == [timedelta(seconds=30), timedelta(seconds=30.5)]
