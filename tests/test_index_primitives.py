"""The primitives the RabbitMQ layer drives, with the same answers on every index backend.

The outbox (``unpublished``, ``mark_published``, ``reject``), delivery by id (``deliverable``,
``claim``, ``mark_delivered``) and ``is_deliverable``, the one-command liveness check consume()
makes before each hand-out (SQLite answers it on the calling thread, from a read-only connection
of its own).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from amqp_queue.state import (
    CommandNotFound,
    CommandStatus,
    EndReason,
    OutboxTaken,
    RedisStore,
    rules,
)
from amqp_queue.state.indexed_store import IndexedStore
from tests.backends import INDEX_BACKENDS, indexed_store
from tests.drain_claims import drained
from tests.support import FakeClock


async def test_only_open_ready_unexpired_commands_are_deliverable(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    ready = await indexed.enqueue("dev-1", b"ready", 600)
    waiting = await indexed.enqueue_with_confirmation("dev-1", "unlock", b"w", 600)
    confirmed = await indexed.enqueue_with_confirmation("dev-1", "open", b"c", 600)
    await indexed.confirm_command(confirmed)
    superseded = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    replacement = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    cancelled = await indexed.enqueue("dev-1", b"no", 600)
    await indexed.cancel_command(cancelled)
    delivered = await indexed.enqueue("dev-2", b"d", 600)
    await indexed.drain_pending("dev-2")
    expiring = await indexed.enqueue("dev-1", b"e", 5)
    clock.advance(5)

    answers = {
        command_id: await indexed.is_deliverable(command_id)
        for command_id in (
            ready,
            waiting,
            confirmed,
            superseded,
            replacement,
            cancelled,
            delivered,
            expiring,
            str(uuid.uuid4()),
        )
    }

    assert [command_id for command_id, live in answers.items() if live] == [
        ready,
        confirmed,
        replacement,
    ]
    assert set(await indexed.deliverable(list(answers))) == {ready, confirmed, replacement}


async def test_outbox_lists_ready_unpublished_commands_in_ready_order(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    waiting = await indexed.enqueue_with_confirmation("dev-1", "unlock", b"c", 600)
    first = await indexed.enqueue("dev-1", b"a", 600)
    short = await indexed.enqueue("dev-2", b"short", 5)
    clock.advance(1)
    second = await indexed.enqueue("dev-2", b"b", 600)
    cancelled = await indexed.enqueue("dev-1", b"no", 600)
    await indexed.cancel_command(cancelled)
    clock.advance(1)
    await indexed.confirm_command(waiting)
    clock.advance(4)

    assert [r.id for r in await indexed.unpublished(10)] == [first, second, waiting]
    assert [r.id for r in await indexed.unpublished(2)] == [first, second]

    await indexed.mark_published([first, short])
    assert [r.id for r in await indexed.unpublished(10)] == [second, waiting]
    published = await indexed.get(first)
    assert published is not None
    assert published.published_at == clock.now


async def test_outbox_breaks_ready_time_ties_by_write_order(indexed: IndexedStore) -> None:
    ids = [await indexed.enqueue("dev-1", f"{n}".encode(), 600) for n in range(30)]

    assert [r.id for r in await indexed.unpublished(7)] == ids[:7]
    await indexed.mark_published(ids[:7])
    assert [r.id for r in await indexed.unpublished(30)] == ids[7:]


async def test_superseded_and_delivered_commands_leave_the_outbox(indexed: IndexedStore) -> None:
    await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    latest = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    drained = await indexed.enqueue("dev-2", b"x", 600)
    await indexed.drain_pending("dev-2")

    assert [r.id for r in await indexed.unpublished(10)] == [latest]
    assert await indexed.get_status(drained) == CommandStatus.DELIVERED


async def test_deliverable_claim_and_mark_delivered_by_id(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    a = await indexed.enqueue("dev-1", b"a", 600)
    b = await indexed.enqueue("dev-1", b"b", 600)
    waiting = await indexed.enqueue_with_confirmation("dev-1", "unlock", b"w", 600)
    expired = await indexed.enqueue("dev-1", b"e", 5)
    other = await indexed.enqueue("dev-2", b"o", 600)
    clock.advance(5)

    found = await indexed.deliverable([a, b, waiting, expired, other])
    assert sorted(found) == sorted([a, b, other])

    claimed = await indexed.claim("dev-1", [b, waiting, expired, other])
    assert [r.id for r in claimed] == [b]
    # Claimed: open to every reader, skipped by delivery, until the drain hands it over.
    assert not claimed[0].delivered
    assert claimed[0].claimed_until is not None
    assert await indexed.get_status(b) == CommandStatus.PENDING
    assert [c.id for c in await indexed.get_pending("dev-1")] == [a, b, waiting]
    assert await indexed.deliverable([b]) == {}
    assert not await indexed.is_deliverable(b)
    assert await indexed.claim("dev-1", [b]) == []
    handed = await indexed.hand_over(claimed)
    # The hand-over keeps the claim's claimed_until: a give-back reopens only its own.
    assert [(r.id, r.delivered, r.claimed_until) for r in handed] == [
        (b, True, claimed[0].claimed_until)
    ]
    # Handed over once: again, nothing new. Redis answers as the first run did (a hand-over
    # its client sent again after a lost reply must not lose what the first run delivered).
    again = [b] if isinstance(indexed, RedisStore) else []
    assert [r.id for r in await indexed.hand_over(claimed)] == again

    assert await indexed.mark_delivered([a, b, waiting]) == 2
    assert await indexed.mark_delivered([a, waiting]) == 0
    assert [await indexed.get_status(i) for i in (a, b, waiting)] == [CommandStatus.DELIVERED] * 3
    assert await indexed.get_pending("dev-1") == []


async def test_a_command_a_device_took_ends_delivered_though_ended_meanwhile(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    """consume() marks a command after the loop body for it: a cancel, a replacement or an
    expiry sweep may come first (a mark held up by an index outage waits long). The device
    has it: DELIVERED, with its outcome reportable; the replacement stays pending."""
    replaced = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    cancelled = await indexed.enqueue("dev-1", b"c", 600)
    expired = await indexed.enqueue("dev-1", b"e", 5)
    handed = [replaced, cancelled, expired]
    assert set(await indexed.deliverable(handed)) == set(handed)  # handed out now
    replacement = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    await indexed.cancel_command(cancelled)
    clock.advance(5)
    await indexed.cleanup()
    rejected = await indexed.enqueue("dev-1", b"r", 600)
    await indexed.reject([rejected])

    assert await indexed.mark_delivered([*handed, rejected]) == 3
    assert await indexed.mark_delivered(handed) == 0

    statuses = [await indexed.get_status(i) for i in (*handed, rejected, replacement)]
    assert statuses == [CommandStatus.DELIVERED] * 3 + [
        CommandStatus.REJECTED,
        CommandStatus.PENDING,
    ]
    assert [c.id for c in await indexed.get_pending("dev-1")] == [replacement]
    await indexed.complete_command(replaced, b"ok")
    assert await indexed.get_status(replaced) == CommandStatus.SUCCEEDED
    # Finished as delivered: kept for the retention from the mark, then pruned.
    clock.advance(indexed.retention.total_seconds() + 1)
    await indexed.cleanup()
    for command_id in (cancelled, expired):
        with pytest.raises(CommandNotFound):
            await indexed.get_status(command_id)


async def test_a_batch_that_replaces_a_type_twice_keeps_only_its_last_command(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    """The group commit writes many enqueues at once; within it the latest intent still wins."""
    old = await indexed.enqueue_or_update("dev-1", "setpoint", b"old", 600)
    lapsed = await indexed.enqueue_or_update("dev-1", "mode", b"lapsed", 5)
    clock.advance(5)
    first, plain, second, mode = batch = [
        indexed.build("dev-1", "setpoint", b"first", 600),
        indexed.build("dev-1", None, b"plain", 600),
        indexed.build("dev-1", "setpoint", b"second", 600),
        indexed.build("dev-1", "mode", b"eco", 600),
    ]

    superseded = await indexed.write(batch, [plain.id])

    assert superseded == 2
    assert [await indexed.get_status(i) for i in (old, lapsed, first.id)] == [
        CommandStatus.SUPERSEDED,
        CommandStatus.EXPIRED,
        CommandStatus.SUPERSEDED,
    ]
    assert [c.id for c in await indexed.get_pending("dev-1")] == [plain.id, second.id, mode.id]
    assert [r.id for r in await indexed.unpublished(10)] == [second.id, mode.id]
    assert await indexed.drain_pending("dev-1") == [b"plain", b"second", b"eco"]


@pytest.mark.parametrize("handed_over", [False, True], ids=["claimed", "handed over"])
async def test_release_opens_claimed_commands_again_as_they_were(
    indexed: IndexedStore, clock: FakeClock, handed_over: bool
) -> None:
    kept = await indexed.enqueue("dev-1", b"kept", 600)
    gone = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    await indexed.mark_published([kept, gone])
    claimed = await indexed.claim("dev-1", [kept, gone])
    assert {r.id for r in claimed} == {kept, gone}
    if handed_over:
        claimed = await indexed.hand_over(claimed)
        assert len(claimed) == 2
    by_id = {record.id: record for record in claimed}

    # kept's message is back in the queue; gone's was acked, so the outbox owes it again.
    assert await indexed.release([by_id[kept]], [by_id[gone]]) == 2

    assert await indexed.get_status(kept) == CommandStatus.PENDING
    assert await indexed.get_status(gone) == CommandStatus.PENDING
    assert [c.id for c in await indexed.get_pending("dev-1")] == [kept, gone]
    assert [r.id for r in await indexed.unpublished(10)] == [gone]
    # Its slot is its own again: a newer command of the type replaces it.
    newer = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    assert await indexed.get_status(gone) == CommandStatus.SUPERSEDED
    assert await indexed.drain_pending("dev-1") == [b"kept", b"21"]
    assert await indexed.get_status(newer) == CommandStatus.DELIVERED


async def test_release_leaves_a_taken_slot_and_an_expired_command_finished(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    replaced = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    expiring = await indexed.enqueue("dev-1", b"soon", 5)
    handed = await drained(indexed, "dev-1", [replaced, expiring])
    newer = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    clock.advance(5)

    assert [record.id for record in handed] == [replaced, expiring]
    assert await indexed.release(handed[:1], handed[1:]) == 0

    assert await indexed.get_status(replaced) == CommandStatus.SUPERSEDED
    assert await indexed.get_status(expiring) == CommandStatus.EXPIRED
    assert [c.id for c in await indexed.get_pending("dev-1")] == [newer]
    assert await indexed.unpublished(10) == [await indexed.get(newer)]


async def test_a_rejected_command_is_finished_for_good_and_frees_its_type(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    """What the outbox does with a command the broker refuses for good (over its size)."""
    plain = await indexed.enqueue("dev-1", b"too big", 600)
    typed = await indexed.enqueue_or_update("dev-1", "firmware", b"too big", 600)
    waiting = await indexed.enqueue_with_confirmation("dev-1", "unlock", b"w", 600)
    delivered = await indexed.enqueue("dev-2", b"d", 600)
    await indexed.drain_pending("dev-2")
    cancelled = await indexed.enqueue("dev-1", b"c", 600)
    await indexed.cancel_command(cancelled)
    clock.advance(1)

    assert await indexed.reject([plain, typed, delivered, cancelled, str(uuid.uuid4())]) == 2
    assert await indexed.reject([plain]) == 0

    assert [await indexed.get_status(i) for i in (plain, typed, delivered, cancelled)] == [
        CommandStatus.REJECTED,
        CommandStatus.REJECTED,
        CommandStatus.DELIVERED,
        CommandStatus.CANCELLED,
    ]
    record = await indexed.get(plain)
    assert record is not None
    assert (record.end_reason, record.ended_at) == (EndReason.REJECTED, clock.now)
    assert [c.id for c in await indexed.get_pending("dev-1")] == [waiting]
    assert await indexed.deliverable([plain, typed]) == {}
    assert not await indexed.is_deliverable(plain)
    assert await indexed.unpublished(10) == []
    assert await indexed.claim("dev-1", [plain, typed]) == []
    assert await indexed.mark_delivered([plain]) == 0
    with pytest.raises(CommandNotFound):
        await indexed.cancel_command(plain)
    with pytest.raises(CommandNotFound):
        await indexed.confirm_command(typed)

    replacement = await indexed.enqueue_or_update("dev-1", "firmware", b"smaller", 600)
    assert await indexed.get_status(typed) == CommandStatus.REJECTED
    assert [r.id for r in await indexed.unpublished(10)] == [replacement]
    assert await indexed.drain_pending("dev-1") == [b"smaller"]
    clock.advance(600)
    assert await indexed.cleanup() == 1  # `waiting`; a rejected command never expires
    assert await indexed.get_status(plain) == CommandStatus.REJECTED


@pytest.mark.parametrize("backend", INDEX_BACKENDS)
async def test_rejected_commands_are_pruned_after_the_retention(
    backend: str, tmp_path: Path, clock: FakeClock
) -> None:
    options = {"clock": clock, "retention": timedelta(hours=1)}
    async with indexed_store(backend, tmp_path, **options) as indexed:
        rejected = await indexed.enqueue("dev-1", b"x", timedelta(days=1))
        assert await indexed.reject([rejected]) == 1

        clock.advance(59 * 60)
        await indexed.cleanup()
        assert await indexed.get_status(rejected) == CommandStatus.REJECTED

        clock.advance(2 * 60)
        await indexed.cleanup()
        with pytest.raises(CommandNotFound):
            await indexed.get_status(rejected)


async def test_the_outbox_belongs_to_the_first_owner_that_claims_it(
    indexed: IndexedStore,
) -> None:
    await indexed.claim_outbox("ble.commands")
    await indexed.claim_outbox("ble.commands")  # a restart, or a replica: the same owner

    with pytest.raises(OutboxTaken, match=r"ble\.commands"):
        await indexed.claim_outbox("other.exchange")


async def test_one_relay_at_a_time_holds_the_relay_lease_until_it_lapses(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    assert await indexed.hold_relay("relay-a", 30)
    assert not await indexed.hold_relay("relay-b", 30)
    clock.advance(20)
    assert await indexed.hold_relay("relay-a", 30)  # renewed: 30 s from now
    clock.advance(20)
    assert not await indexed.hold_relay("relay-b", 30)
    clock.advance(11)  # relay-a stopped renewing (it died): the lease is free
    assert await indexed.hold_relay("relay-b", 30)
    assert not await indexed.hold_relay("relay-a", 30)


async def test_a_relay_lease_given_up_is_free_at_once(indexed: IndexedStore) -> None:
    assert await indexed.hold_relay("relay-a", 30)
    await indexed.hold_relay("relay-a", 0)

    assert await indexed.hold_relay("relay-b", 30)


async def test_the_relay_lease_does_not_disturb_the_outbox_owner(indexed: IndexedStore) -> None:
    await indexed.claim_outbox("ble.commands")
    assert await indexed.hold_relay("relay-a", 30)

    await indexed.claim_outbox("ble.commands")
    with pytest.raises(OutboxTaken):
        await indexed.claim_outbox("relay-a")


async def test_release_of_two_commands_of_one_slot_reopens_only_the_newer(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    """A drain claimed A, then B replaced it as the slot's open command and was claimed
    too; the drain is cancelled: B is the latest intent, A stays replaced."""
    older = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    first = await indexed.claim("dev-1", [older])
    clock.advance(1)
    newer = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    second = await indexed.claim("dev-1", [newer])

    assert await indexed.release([], [*first, *second]) == 1

    assert await indexed.get_status(older) == CommandStatus.SUPERSEDED
    assert await indexed.get_status(newer) == CommandStatus.PENDING
    assert await indexed.drain_pending("dev-1") == [b"21"]


async def test_release_never_gives_back_a_command_with_an_outcome(indexed: IndexedStore) -> None:
    """An outcome is proof the device took the command: a drain cut short does not undo it."""
    plain = await indexed.enqueue("dev-1", b"plain", 600)
    typed = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    other = await indexed.enqueue_or_update("dev-1", "setpoint-2", b"x", 600)
    by_id = {record.id: record for record in await drained(indexed, "dev-1")}
    await indexed.complete_command(plain, b"ok")
    await indexed.fail_command(typed, "no")

    assert await indexed.release([by_id[plain], by_id[other]], [by_id[typed]]) == 1

    assert await indexed.get_status(plain) == CommandStatus.SUCCEEDED
    assert await indexed.get_status(typed) == CommandStatus.FAILED
    assert await indexed.get_status(other) == CommandStatus.PENDING


async def test_a_rollouts_unpublished_members_are_its_deliverable_unmarked_ones(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    devices = [f"dev-{n}" for n in range(4)]
    rollout = await indexed.enqueue_many(
        devices, b"fw", 600, command_type="fw", requires_confirmation=True
    )
    assert await indexed.rollout_unpublished(rollout.rollout_id) == []  # none confirmed yet
    await indexed.confirm_rollout(rollout.rollout_id)
    published, cancelled, _delivered, unmarked = rollout.command_ids
    await indexed.mark_published([published])
    await indexed.cancel_command(cancelled)
    await indexed.drain_pending("dev-2")
    assert await indexed.rollout_unpublished(rollout.rollout_id) == [unmarked]
    clock.advance(600)
    assert await indexed.rollout_unpublished(rollout.rollout_id) == []
    assert await indexed.rollout_unpublished(str(uuid.uuid4())) == []


async def test_deliverable_and_mark_delivered_take_more_ids_than_a_statement_binds(
    indexed: IndexedStore,
) -> None:
    """PostgreSQL binds 32,767 parameters at most: a rollout's repeated confirm asks about
    every member, a store's streams mark their windows together."""
    live = await indexed.enqueue("dev-1", b"x", 600)
    ids = [str(uuid.uuid4()) for _ in range(40_000)] + [live]
    assert list(await indexed.deliverable(ids)) == [live]
    assert await indexed.mark_delivered(ids) == 1
    assert await indexed.get_status(live) == CommandStatus.DELIVERED


async def test_a_claim_nobody_hands_over_lapses_and_its_hand_over_then_fails(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    """A drain that died between its claim and its hand-over: once the lease is over the
    command is deliverable again, and the dead claim can no longer hand it out."""
    command_id = await indexed.enqueue("dev-1", b"x", 600)
    dead = await indexed.claim("dev-1")
    clock.advance(rules.CLAIM_LEASE.total_seconds() - 1)
    assert await indexed.claim("dev-1") == []
    clock.advance(2)  # past the lease and its random part (under a second)

    assert await indexed.is_deliverable(command_id)
    again = await indexed.claim("dev-1")
    assert [record.id for record in again] == [command_id]
    assert await indexed.hand_over(dead) == []
    assert [record.id for record in await indexed.hand_over(again)] == [command_id]
    assert await indexed.get_status(command_id) == CommandStatus.DELIVERED


async def test_a_give_back_leaves_alone_what_a_device_took_after_its_claim_ended(
    indexed: IndexedStore,
) -> None:
    """A drain's claim ended by a reader of its redelivered message (the drain seemed dead),
    the reader's device took the command; the drain, alive after all, gives back: the
    command stays DELIVERED, where reopening it would deliver it a second time."""
    command_id = await indexed.enqueue("dev-1", b"x", 600)
    claimed = await indexed.claim("dev-1")
    assert await indexed.end_claims([command_id]) == 1
    assert await indexed.is_deliverable(command_id)
    assert await indexed.mark_delivered([command_id]) == 1

    assert await indexed.hand_over(claimed) == []
    assert await indexed.release(claimed, claimed) == 0
    assert await indexed.get_status(command_id) == CommandStatus.DELIVERED
    assert await indexed.unpublished(10) == []


async def test_a_give_back_leaves_alone_what_another_drain_claimed_and_handed_over(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    """A drain slower than its lease: its claim lapsed, another drain claimed the command
    and handed it over. The slow drain's give-back leaves that delivery alone."""
    command_id = await indexed.enqueue("dev-1", b"x", 600)
    slow = await indexed.claim("dev-1")
    clock.advance(rules.CLAIM_LEASE.total_seconds() + 1)
    other = await drained(indexed, "dev-1")
    assert [record.id for record in other] == [command_id]

    assert await indexed.release(slow, []) == 0
    assert await indexed.get_status(command_id) == CommandStatus.DELIVERED
