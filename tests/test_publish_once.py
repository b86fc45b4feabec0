"""Without a broker or network fault each command is published exactly once, in ready order
per device, also when the enqueuing call is cancelled, and the outbox relay never publishes
a command whose direct publish is in flight (in this process or another one on the same
state). Counted on the broker: a device queue holds one message per command.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import QueueError, RabbitMQStore
from amqp_queue.state import CommandRecord, SqlStore
from tests.rabbitmq_support import queue_depth
from tests.shared_index import INDEX_KINDS, drain_until, shared_index

DEVICE = "dev-1"
COMMANDS = 300


async def _relay_until(store: RabbitMQStore, work: asyncio.Future[Any]) -> None:
    """Runs outbox passes back to back until ``work`` is done (an operator's
    ``relay_outbox``, or another process's relay, racing the enqueues)."""
    while not work.done():
        await store.relay_outbox()
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_concurrent_enqueues_while_the_relay_runs_are_each_published_once(
    kind: str, tmp_path: Path
) -> None:
    async with (
        shared_index(kind, tmp_path) as shared,
        shared.store(await shared.open_index()) as store,
    ):
        await store.ensure_queue(DEVICE)
        enqueues = asyncio.gather(
            *(store.enqueue(DEVICE, f"c{n}".encode(), 600) for n in range(COMMANDS))
        )
        await _relay_until(store, enqueues)
        await enqueues

        assert await queue_depth(store, DEVICE) == COMMANDS


async def _produce_in_waves(store: RabbitMQStore, waves: int, per_wave: int) -> list[str]:
    ids: list[str] = []
    for wave in range(waves):
        ids += await asyncio.gather(
            *(store.enqueue(DEVICE, f"w{wave}-{n}".encode(), 600) for n in range(per_wave))
        )
    return ids


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_another_stores_relay_does_not_republish_commands_being_published(
    kind: str, tmp_path: Path
) -> None:
    async with (
        shared_index(kind, tmp_path) as shared,
        shared.store(await shared.open_index()) as producer,
        shared.store(await shared.open_index()) as other,
    ):
        await producer.ensure_queue(DEVICE)
        producing = asyncio.ensure_future(_produce_in_waves(producer, 10, 30))
        await _relay_until(other, producing)
        ids = await producing

        assert await queue_depth(producer, DEVICE) == len(ids)


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_a_store_starting_up_does_not_republish_commands_being_published(
    kind: str, tmp_path: Path
) -> None:
    # Each start-up makes one outbox pass, as a process (re)starting beside a busy one does.
    async with shared_index(kind, tmp_path) as shared:
        other_index = await shared.open_index()
        async with shared.store(await shared.open_index()) as producer:
            await producer.ensure_queue(DEVICE)
            starts = 0

            async def restart() -> None:
                nonlocal starts
                while starts < 3:
                    async with shared.store(other_index):
                        starts += 1

            restarting = asyncio.create_task(restart())
            ids: list[str] = []
            while not restarting.done():
                ids += await asyncio.gather(
                    *(producer.enqueue(DEVICE, f"c{len(ids) + n}".encode(), 600) for n in range(30))
                )
            await restarting

            assert await queue_depth(producer, DEVICE) == len(ids)


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_a_dead_writers_commands_are_published_once_by_several_relays(
    kind: str, tmp_path: Path
) -> None:
    # relay_after=0: the commands are orphans at once (their writer died before publishing).
    async with (
        shared_index(kind, tmp_path, relay_after=0) as shared,
        shared.store(await shared.open_index()) as first,
        shared.store(await shared.open_index()) as second,
        shared.store(await shared.open_index()) as third,
    ):
        await first.ensure_queue(DEVICE)
        orphans = [first.build(DEVICE, None, f"o{n}".encode(), 600) for n in range(50)]
        await (await shared.open_index()).add(orphans)

        await asyncio.gather(*(s.relay_outbox() for s in (first, second, third)))
        await asyncio.gather(*(s.relay_outbox() for s in (first, second, third)))

        assert await queue_depth(first, DEVICE) == len(orphans)
        assert [c.id for c in await first.get_pending(DEVICE)] == [r.id for r in orphans]


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_a_command_left_unpublished_by_a_crash_keeps_its_place_after_a_restart(
    kind: str, tmp_path: Path
) -> None:
    # The process died between its write and its publish, and came back at once: its
    # command is younger than relay_after, so the new process must not publish the next
    # command to that device ahead of it.
    async with shared_index(kind, tmp_path, relay_after=1.0, relay_interval=0.2) as shared:
        index = await shared.open_index()
        async with shared.store(await shared.open_index()) as before:
            await before.ensure_queue(DEVICE)
            left = before.build(DEVICE, None, b"first", 600)
            other = before.build("dev-2", None, b"other", 600)
        await index.add([left, other])
        async with shared.store(await shared.open_index()) as after:
            await after.enqueue(DEVICE, b"second", 600)
            received = await drain_until(after, DEVICE, count=2, seconds=5)

        assert received == [b"first", b"second"]


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_a_backlog_longer_than_one_relay_read_keeps_its_place_after_a_restart(
    kind: str, tmp_path: Path
) -> None:
    # More commands left unpublished than the relay reads at once (relay_batch): the ones
    # past its first read must not be overtaken either.
    options = {"relay_after": 1.0, "relay_interval": 0.2, "relay_batch": 3}
    async with shared_index(kind, tmp_path, **options) as shared:
        index = await shared.open_index()
        async with shared.store(await shared.open_index()) as before:
            await before.ensure_queue(DEVICE)
            others = [before.build(f"dev-x{n}", None, b"x", 600) for n in range(4)]
            left = [before.build(DEVICE, None, f"left-{n}".encode(), 600) for n in range(3)]
        await index.add([*others, *left])
        async with shared.store(await shared.open_index()) as after:
            await after.enqueue(DEVICE, b"new", 600)
            received = await drain_until(after, DEVICE, count=4, seconds=6)

        assert received == [b"left-0", b"left-1", b"left-2", b"new"]


async def test_a_command_confirmed_several_times_at_once_is_published_once(
    tmp_path: Path,
) -> None:
    # Confirming twice is harmless (rule 4): it must not publish the command twice.
    async with (
        shared_index("sqlite", tmp_path) as shared,
        shared.store(await shared.open_index()) as store,
    ):
        ids = [
            await store.enqueue_with_confirmation(DEVICE, f"t{n}", f"c{n}".encode(), 600)
            for n in range(20)
        ]
        await asyncio.gather(
            *(store.confirm_command(command_id) for command_id in ids for _ in range(3))
        )

        assert await queue_depth(store, DEVICE) == len(ids)


class CancelsAfterWrite(SqlStore):
    """An index that, once it has written the next new command, cancels ``victim`` (the
    enqueue that submitted it): the command is durable, its publish has not begun."""

    victim: asyncio.Task[str] | None = None
    fired = False

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        superseded = await super().write(records, published)
        if records and self.victim is not None:
            victim, self.victim = self.victim, None
            victim.cancel()
            self.fired = True
        return superseded


async def test_a_command_whose_enqueue_was_cancelled_after_its_write_keeps_its_place(
    tmp_path: Path,
) -> None:
    async with shared_index("sqlite", tmp_path) as shared:
        state = await shared.open_index(CancelsAfterWrite)
        assert isinstance(state, CancelsAfterWrite)
        async with shared.store(state) as store:
            await store.ensure_queue(DEVICE)
            enqueue = asyncio.create_task(store.enqueue(DEVICE, b"first", 600))
            state.victim = enqueue
            await asyncio.wait([enqueue], timeout=5)
            assert state.fired, "the enqueue was not cancelled after its write"
            # Accepted by the index: the command must reach the device, and before any
            # command enqueued after it.
            assert [c.payload for c in await store.get_pending(DEVICE)] == [b"first"]

            await store.enqueue(DEVICE, b"second", 600)
            received = await drain_until(store, DEVICE, count=2, seconds=2)

            assert received == [b"first", b"second"]


class OutboxReadBreaks(SqlStore):
    """An index whose next ``breaks`` outbox reads fail with an unexpected exception (not
    the StateError the relay retries on)."""

    breaks = 0
    broken = 0

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        if self.breaks:
            self.breaks -= 1
            self.broken += 1
            raise RuntimeError("injected: an unexpected failure in the outbox read")
        return await super().unpublished(limit)


async def test_the_relay_survives_an_unexpected_error_or_the_store_fails_loudly(
    tmp_path: Path,
) -> None:
    # relay_after=0: the relay takes a dead writer's command at once, not after its lease.
    async with shared_index("sqlite", tmp_path, relay_interval=0.2, relay_after=0) as shared:
        state = await shared.open_index(OutboxReadBreaks)
        assert isinstance(state, OutboxReadBreaks)
        store_context = shared.store(state)
        store = await store_context.__aenter__()
        try:
            await store.ensure_queue(DEVICE)
            state.breaks = 1
            async with asyncio.timeout(3):
                while not state.broken:  # noqa: ASYNC110 - the relay's timer reads it
                    await asyncio.sleep(0.05)
            # A command left to the relay: written by a process that died before publishing.
            left = store.build(DEVICE, None, b"left", 600)
            await state.add([left])

            published = False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3
            while not published and loop.time() < deadline:
                record = await state.get(left.id)
                published = record is not None and record.published_at is not None
                await asyncio.sleep(0.05)
            if not published:
                try:
                    await store.enqueue(DEVICE, b"after", 600)
                except QueueError:
                    return  # the store failed loudly: acceptable
                raise AssertionError(
                    "the outbox relay died silently: a command left to it was not published "
                    "within 3 s, and the store goes on accepting commands"
                )
            assert await queue_depth(store, DEVICE) == 1
        finally:
            # Today the dead relay's exception comes out of close(); that is not what
            # this test asserts on.
            with contextlib.suppress(RuntimeError):
                await store_context.__aexit__(None, None, None)
