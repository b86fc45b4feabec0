"""Who enqueued, confirmed and cancelled each command: kept with the record on every backend
(``by=``), and the fleet-wide lists the operator console reads."""

from __future__ import annotations

import pytest

from amqp_queue import CommandStatus, InvalidInput, Store
from tests.support import FakeClock


async def test_the_record_names_who_enqueued_confirmed_and_cancelled(store: Store) -> None:
    confirmed_id = await store.enqueue_with_confirmation("dev-a", "unlock", b"1", 60, by="alice")
    cancelled_id = await store.enqueue_or_update("dev-a", "light", b"on", 60, by="carol")
    plain_id = await store.enqueue("dev-a", b"x", 60)

    await store.confirm_command(confirmed_id, by="bob")
    await store.cancel_command(cancelled_id, by="dave")

    confirmed = await store.get_command(confirmed_id)
    assert (confirmed.enqueued_by, confirmed.confirmed_by, confirmed.cancelled_by) == (
        "alice",
        "bob",
        None,
    )
    cancelled = await store.get_command(cancelled_id)
    assert (cancelled.enqueued_by, cancelled.confirmed_by, cancelled.cancelled_by) == (
        "carol",
        None,
        "dave",
    )
    assert cancelled.end_reason is not None
    plain = await store.get_command(plain_id)
    assert (plain.enqueued_by, plain.confirmed_by, plain.cancelled_by) == (None, None, None)


async def test_a_confirmation_that_changes_nothing_keeps_the_first_confirmer(
    store: Store,
) -> None:
    command_id = await store.enqueue_with_confirmation("dev-a", "unlock", b"1", 60, by="alice")
    await store.confirm_command(command_id, by="bob")
    await store.confirm_command(command_id, by="eve")

    assert (await store.get_command(command_id)).confirmed_by == "bob"


async def test_rollouts_record_who_enqueued_confirmed_and_cancelled(store: Store) -> None:
    confirmed = await store.enqueue_many(
        ["dev-a", "dev-b"], b"fw", 60, command_type="fw", requires_confirmation=True, by="ops"
    )
    cancelled = await store.enqueue_many(["dev-c", "dev-d"], b"x", 60, by="ops")

    assert await store.confirm_rollout(confirmed.rollout_id, by="boss") == 2
    assert await store.cancel_rollout(cancelled.rollout_id, by="boss2") == 2

    for command_id in confirmed.command_ids:
        record = await store.get_command(command_id)
        assert (record.enqueued_by, record.confirmed_by) == ("ops", "boss")
    for command_id in cancelled.command_ids:
        record = await store.get_command(command_id)
        assert (record.enqueued_by, record.cancelled_by) == ("ops", "boss2")


@pytest.mark.parametrize("by", ["", "x" * 201, "a\nb", 7])
async def test_a_bad_name_is_refused_and_nothing_changes(store: Store, by: object) -> None:
    with pytest.raises(InvalidInput):
        await store.enqueue("dev-a", b"x", 60, by=by)  # type: ignore[arg-type]
    assert await store.get_pending("dev-a") == []
    command_id = await store.enqueue_with_confirmation("dev-a", "unlock", b"1", 60)
    with pytest.raises(InvalidInput):
        await store.confirm_command(command_id, by=by)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await store.cancel_command(command_id, by=by)  # type: ignore[arg-type]
    assert await store.get_status(command_id) is CommandStatus.AWAITING_CONFIRMATION


async def test_the_inbox_lists_every_device_oldest_first_in_pages(
    store: Store, clock: FakeClock
) -> None:
    ids = []
    for n, device in enumerate(["gw-2", "gw-1", "hub-1", "gw-3", "gw-1"]):
        ids.append(
            await store.enqueue_with_confirmation(device, f"kind{n % 2}", b"p", 600, by=f"u{n}")
        )
        clock.advance(1)
    await store.enqueue("gw-1", b"plain", 600)
    await store.confirm_command(ids[3], by="boss")

    every = await store.awaiting_confirmation()
    assert [record.id for record in every] == [ids[0], ids[1], ids[2], ids[4]]
    assert [record.enqueued_by for record in every] == ["u0", "u1", "u2", "u4"]

    first = await store.awaiting_confirmation(limit=2)
    last = first[-1]
    rest = await store.awaiting_confirmation(after=(last.created_at, last.id), limit=2)
    assert [record.id for record in first + rest] == [ids[0], ids[1], ids[2], ids[4]]

    by_prefix = await store.awaiting_confirmation(device_prefix="gw-")
    assert [record.id for record in by_prefix] == [ids[0], ids[1], ids[4]]
    by_type = await store.awaiting_confirmation(command_type="kind0", device_prefix="gw")
    assert [record.id for record in by_type] == [ids[0], ids[4]]

    clock.advance(600)
    assert await store.awaiting_confirmation() == []


async def test_ties_in_time_page_by_id(store: Store) -> None:
    ids = {await store.enqueue_with_confirmation(f"d{n}", "k", b"p", 60) for n in range(5)}
    seen: list[str] = []
    after = None
    while page := await store.awaiting_confirmation(after=after, limit=2):
        seen += [record.id for record in page]
        after = (page[-1].created_at, page[-1].id)
    assert seen == sorted(ids)


async def test_devices_with_open_commands_are_counted_by_status(
    store: Store, clock: FakeClock
) -> None:
    await store.enqueue("dev-b", b"1", 60)
    await store.enqueue_with_confirmation("dev-b", "unlock", b"2", 60)
    await store.enqueue("dev-a", b"3", 60)
    await store.enqueue("dev-c", b"4", 10)
    done = await store.enqueue("dev-d", b"5", 60)
    await store.cancel_command(done)

    summaries = await store.devices_with_open()
    assert [(s.device_id, s.pending, s.awaiting_confirmation) for s in summaries] == [
        ("dev-a", 1, 0),
        ("dev-b", 1, 1),
        ("dev-c", 1, 0),
    ]
    page = await store.devices_with_open(after="dev-a", limit=1)
    assert [s.device_id for s in page] == ["dev-b"]

    clock.advance(10)
    assert [s.device_id for s in await store.devices_with_open()] == ["dev-a", "dev-b"]


async def test_a_device_history_holds_every_status_newest_first(
    store: Store, clock: FakeClock
) -> None:
    delivered = await store.enqueue("dev-a", b"1", 60)
    clock.advance(1)
    assert await store.drain_pending("dev-a") == [b"1"]
    cancelled = await store.enqueue("dev-a", b"2", 60, by="alice")
    await store.cancel_command(cancelled, by="bob")
    clock.advance(1)
    superseded = await store.enqueue_or_update("dev-a", "light", b"3", 60)
    clock.advance(1)
    latest = await store.enqueue_or_update("dev-a", "light", b"4", 60)
    await store.enqueue("dev-b", b"other", 60)

    history = await store.device_history("dev-a")
    assert [record.id for record in history] == [latest, superseded, cancelled, delivered]
    assert history[2].cancelled_by == "bob"
    assert history[3].delivered

    page = await store.device_history("dev-a", limit=2)
    rest = await store.device_history("dev-a", before=(page[-1].created_at, page[-1].id))
    assert [record.id for record in page + rest] == [latest, superseded, cancelled, delivered]
