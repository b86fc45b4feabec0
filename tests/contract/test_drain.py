"""Rule 2: drain_pending hands out every ready command once, in the order it became ready."""

from __future__ import annotations

import asyncio

from amqp_queue.state import CommandStatus, Store
from tests.support import FakeClock


async def test_drain_returns_ready_payloads_in_enqueue_order(store: Store) -> None:
    for payload in (b"1", b"2", b"3"):
        await store.enqueue("dev-1", payload, 60)

    assert await store.drain_pending("dev-1") == [b"1", b"2", b"3"]


async def test_drain_marks_commands_delivered_and_never_returns_them_again(store: Store) -> None:
    command_id = await store.enqueue("dev-1", b"once", 60)

    assert await store.drain_pending("dev-1") == [b"once"]
    assert await store.drain_pending("dev-1") == []
    assert await store.get_pending("dev-1") == []
    assert await store.get_status(command_id) == CommandStatus.DELIVERED


async def test_drain_skips_commands_awaiting_confirmation(store: Store) -> None:
    waiting = await store.enqueue_with_confirmation("dev-1", "unlock", b"secret", 60)
    await store.enqueue("dev-1", b"plain", 60)

    assert await store.drain_pending("dev-1") == [b"plain"]
    assert [c.id for c in await store.get_pending("dev-1")] == [waiting]


async def test_confirmed_command_is_drained_in_order_of_confirmation(
    store: Store, clock: FakeClock
) -> None:
    waiting = await store.enqueue_with_confirmation("dev-1", "unlock", b"confirmed-late", 600)
    clock.advance(1)
    await store.enqueue("dev-1", b"ready-early", 600)
    clock.advance(1)
    await store.confirm_command(waiting)
    clock.advance(1)
    await store.enqueue("dev-1", b"ready-late", 600)

    assert await store.drain_pending("dev-1") == [b"ready-early", b"confirmed-late", b"ready-late"]


async def test_drain_skips_expired_commands(store: Store, clock: FakeClock) -> None:
    expired = await store.enqueue("dev-1", b"old", 5)
    await store.enqueue("dev-1", b"fresh", 60)
    clock.advance(5)

    assert await store.drain_pending("dev-1") == [b"fresh"]
    assert await store.get_status(expired) == CommandStatus.EXPIRED


async def test_concurrent_drains_hand_out_every_command_exactly_once(store: Store) -> None:
    sent = [f"cmd-{n}".encode() for n in range(200)]
    for payload in sent:
        await store.enqueue("dev-1", payload, 600)

    batches = await asyncio.gather(*(store.drain_pending("dev-1") for _ in range(50)))

    received = [payload for batch in batches for payload in batch]
    assert sorted(received) == sorted(sent)
    for batch in batches:
        assert batch == sorted(batch, key=sent.index)
