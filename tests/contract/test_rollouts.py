"""Rule 10: enqueue_many writes one command per device atomically and returns a rollout,
which is confirmed, cancelled and summarised as a whole; retire_device ends a device's
open commands."""

from __future__ import annotations

import uuid

import pytest

from amqp_queue import (
    CommandNotFound,
    CommandStatus,
    InvalidCommandType,
    InvalidDeviceId,
    InvalidInput,
    Limits,
    QueueFull,
    RolloutNotFound,
    Store,
)
from tests.backends import commands_held
from tests.conftest import OpenStore
from tests.support import FakeClock

DEVICES = ["dev-a", "dev-b", "dev-c"]


async def test_enqueue_many_queues_one_command_per_device_in_order(store: Store) -> None:
    rollout = await store.enqueue_many(DEVICES, b"firmware 2.1", 600)

    assert len(rollout.command_ids) == 3
    assert len(set(rollout.command_ids)) == 3
    uuid.UUID(rollout.rollout_id)
    for device, command_id in zip(DEVICES, rollout.command_ids, strict=True):
        [pending] = await store.get_pending(device)
        assert (pending.id, pending.payload, pending.command_type) == (
            command_id,
            b"firmware 2.1",
            None,
        )
        assert await store.drain_pending(device) == [b"firmware 2.1"]


async def test_any_bad_device_id_writes_nothing(store: Store) -> None:
    for devices in (
        ["dev-a", "bad id"],
        ["dev-a", ""],
        ["dev-a", "dev-b", "dev-a"],
        [],
        "dev-a",
    ):
        with pytest.raises(InvalidDeviceId):
            await store.enqueue_many(devices, b"x", 60)
    with pytest.raises(InvalidInput):
        await store.enqueue_many(["dev-a"], b"x", 0)
    with pytest.raises(InvalidCommandType):
        await store.enqueue_many(["dev-a"], b"x", 60, command_type="bad type")
    with pytest.raises(InvalidInput):
        await store.enqueue_many(["dev-a"], b"x", 60, requires_confirmation=True)
    assert await commands_held(store) == 0


async def test_a_device_at_its_limit_fails_the_whole_fan_out(open_store: OpenStore) -> None:
    async with open_store(limits=Limits(max_pending_per_device=1)) as store:
        await store.enqueue("dev-c", b"busy", 60)
        held = await commands_held(store)

        with pytest.raises(QueueFull) as raised:
            await store.enqueue_many(DEVICES, b"x", 60)

        assert raised.value.device_id == "dev-c"
        assert await commands_held(store) == held
        assert await store.get_pending("dev-a") == []


async def test_a_typed_fan_out_replaces_each_devices_open_command(store: Store) -> None:
    old = await store.enqueue_or_update("dev-a", "config", b"v1", 600)

    rollout = await store.enqueue_many(DEVICES, b"v2", 600, command_type="config")

    assert await store.get_status(old) == CommandStatus.SUPERSEDED
    assert await store.drain_pending("dev-a") == [b"v2"]
    summary = await store.rollout_summary(rollout.rollout_id)
    assert summary.counts[CommandStatus.DELIVERED] == 1
    assert summary.counts[CommandStatus.PENDING] == 2


async def test_a_rollout_is_confirmed_as_a_whole(store: Store) -> None:
    rollout = await store.enqueue_many(
        DEVICES, b"fw", 600, command_type="firmware", requires_confirmation=True
    )
    assert await store.drain_pending("dev-a") == []
    summary = await store.rollout_summary(rollout.rollout_id)
    assert summary.counts[CommandStatus.AWAITING_CONFIRMATION] == 3

    await store.cancel_command(rollout.command_ids[2])
    assert await store.confirm_rollout(rollout.rollout_id) == 2
    assert await store.confirm_rollout(rollout.rollout_id) == 0  # harmless again

    assert await store.drain_pending("dev-a") == [b"fw"]
    assert await store.drain_pending("dev-b") == [b"fw"]
    assert await store.drain_pending("dev-c") == []
    summary = await store.rollout_summary(rollout.rollout_id)
    assert summary.counts[CommandStatus.DELIVERED] == 2
    assert summary.counts[CommandStatus.CANCELLED] == 1
    assert summary.total == 3


async def test_a_rollout_is_cancelled_as_a_whole_sparing_what_was_delivered(
    store: Store,
) -> None:
    rollout = await store.enqueue_many(DEVICES, b"fw", 600)
    await store.drain_pending("dev-a")

    assert await store.cancel_rollout(rollout.rollout_id) == 2
    assert await store.cancel_rollout(rollout.rollout_id) == 0

    statuses = [await store.get_status(command_id) for command_id in rollout.command_ids]
    assert statuses == [CommandStatus.DELIVERED, CommandStatus.CANCELLED, CommandStatus.CANCELLED]
    assert await store.drain_pending("dev-b") == []


async def test_the_summary_counts_every_status(store: Store, clock: FakeClock) -> None:
    devices = [f"dev-{n}" for n in range(7)]
    rollout = await store.enqueue_many(devices, b"x", 60, command_type="t")
    ids = rollout.command_ids
    for device in devices[:3]:
        await store.drain_pending(device)
    await store.complete_command(ids[0], b"ok")
    await store.fail_command(ids[1], "no")
    await store.cancel_command(ids[3])
    await store.enqueue_or_update("dev-4", "t", b"newer", 600)
    clock.advance(61)

    summary = await store.rollout_summary(rollout.rollout_id)

    assert dict(summary.counts) == {
        **{status: 0 for status in CommandStatus},
        CommandStatus.SUCCEEDED: 1,
        CommandStatus.FAILED: 1,
        CommandStatus.DELIVERED: 1,
        CommandStatus.CANCELLED: 1,
        CommandStatus.SUPERSEDED: 1,
        CommandStatus.EXPIRED: 2,
    }
    assert summary.rollout_id == rollout.rollout_id


async def test_the_summary_splits_open_commands_by_confirmation_and_ttl(
    store: Store, clock: FakeClock
) -> None:
    devices = [f"dev-{n}" for n in range(5)]
    rollout = await store.enqueue_many(
        devices, b"x", 60, command_type="fw", requires_confirmation=True
    )
    ids = rollout.command_ids
    await store.confirm_command(ids[0])
    await store.confirm_command(ids[1])
    await store.drain_pending("dev-1")

    live = await store.rollout_summary(rollout.rollout_id)
    clock.advance(61)
    expired = await store.rollout_summary(rollout.rollout_id)

    assert {s: n for s, n in live.counts.items() if n} == {
        CommandStatus.DELIVERED: 1,
        CommandStatus.PENDING: 1,
        CommandStatus.AWAITING_CONFIRMATION: 3,
    }
    assert {s: n for s, n in expired.counts.items() if n} == {
        CommandStatus.DELIVERED: 1,
        CommandStatus.EXPIRED: 4,
    }


async def test_an_unknown_rollout_is_a_clear_error(store: Store) -> None:
    for rollout_id in (str(uuid.uuid4()), "not-a-uuid"):
        with pytest.raises(RolloutNotFound):
            await store.rollout_summary(rollout_id)
        with pytest.raises(RolloutNotFound):
            await store.confirm_rollout(rollout_id)
        with pytest.raises(RolloutNotFound):
            await store.cancel_rollout(rollout_id)
        with pytest.raises(RolloutNotFound):
            await store.rollout_enqueuer(rollout_id)


async def test_a_rollout_says_who_enqueued_it(store: Store) -> None:
    named = await store.enqueue_many(
        DEVICES, b"x", 600, command_type="firmware", requires_confirmation=True, by="ann"
    )
    anonymous = await store.enqueue_many(DEVICES, b"y", 600)

    assert await store.rollout_enqueuer(named.rollout_id) == "ann"
    assert await store.rollout_enqueuer(anonymous.rollout_id) is None


async def test_retiring_a_device_cancels_its_open_commands(store: Store, clock: FakeClock) -> None:
    delivered = await store.enqueue("dev-a", b"old", 600)
    await store.drain_pending("dev-a")
    pending = await store.enqueue("dev-a", b"p", 600)
    awaiting = await store.enqueue_with_confirmation("dev-a", "t", b"a", 600)
    expired = await store.enqueue("dev-a", b"e", 5)
    other = await store.enqueue("dev-b", b"b", 600)
    clock.advance(10)

    assert await store.retire_device("dev-a") == 2

    assert await store.get_status(pending) == CommandStatus.CANCELLED
    assert await store.get_status(awaiting) == CommandStatus.CANCELLED
    assert await store.get_status(delivered) == CommandStatus.DELIVERED
    assert await store.get_status(expired) == CommandStatus.EXPIRED
    assert await store.get_status(other) == CommandStatus.PENDING
    assert await store.get_pending("dev-a") == []
    with pytest.raises(CommandNotFound):
        await store.confirm_command(awaiting)
    assert await store.retire_device("dev-a") == 0
    with pytest.raises(InvalidDeviceId):
        await store.retire_device("bad id")
