"""The outbox relay never lets a later command overtake one left behind its backlog.

While the relay has a backlog, a new command is left to it (published after the backlog, in
ready order). A command committed just after the relay's read began is not in that read; if
the relay then declared itself done, the next command would be published directly, ahead of
it. Found when a broker-side connection close reordered two commands; reproduced here with
an index whose outbox read is held open until the racing command has been accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

from amqp_queue import RabbitMQStore
from amqp_queue.state import SqlStore
from amqp_queue.state.model import CommandRecord
from amqp_queue.state.sql import create_engine
from tests.rabbitmq_support import queue_depth, store_on_index


class HeldOutboxRead(SqlStore):
    """A SQLite index whose next outbox reads, once armed, each wait after reading."""

    _holds: list[tuple[asyncio.Event, asyncio.Event]]

    def arm(self, reads: int) -> list[tuple[asyncio.Event, asyncio.Event]]:
        """For each of the next ``reads`` reads: an event set when it has read, and one
        that lets it return."""
        self._holds = [(asyncio.Event(), asyncio.Event()) for _ in range(reads)]
        return list(self._holds)

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        records = await super().unpublished(limit)
        holds = getattr(self, "_holds", [])
        if holds:
            done_reading, may_return = holds.pop(0)
            done_reading.set()
            await may_return.wait()
        return records


async def test_a_command_committed_during_the_relays_read_keeps_its_place(
    tmp_path: Path,
) -> None:
    state = HeldOutboxRead(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"))
    async with store_on_index(state) as store:
        await store.ensure_queue("dev-1")
        (first_read, first_release), (next_read, next_release) = state.arm(2)
        # What a reconnect does: the relay makes a pass, here one whose reads are slow.
        assert store._relay is not None
        store._relay.kick()
        await asyncio.wait_for(first_read.wait(), 5)
        # Owed to the relay, whose pass is under way, an enqueue returns once the relay
        # published its command: each is let go once its command is written.
        first_call = asyncio.create_task(store.enqueue("dev-1", b"first", 600))
        await _owed(store, 1)  # written after the pass read, and left to the relay
        first_release.set()
        # The relay reads again (it must: a command came in during its read); while
        # it does, the next command arrives.
        await asyncio.wait_for(next_read.wait(), 5)
        second_call = asyncio.create_task(store.enqueue("dev-1", b"second", 600))
        await _owed(store, 2)
        next_release.set()
        first, second = await first_call, await second_call

        async with asyncio.timeout(5):
            # Polls the index the relay writes (within the relay's 30 s interval).
            while not await _all_published(state, first, second):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        received: list[bytes] = []
        async with store.consume("dev-1") as stream:
            async for command in stream:  # queue order, as a device sees it
                received.append(command.payload)
                if len(received) == 2:
                    break
        assert received == [b"first", b"second"]


async def _owed(store: RabbitMQStore, count: int) -> None:
    """Waits until the relay owes ``count`` commands. Not only until they are written: under
    the test command's load the read was let go between a call's write and its hand-over to
    the relay, the pass ended meanwhile, and the call published directly, as it may (the
    test then waited for a read that had no reason to come)."""
    assert store._relay is not None
    async with asyncio.timeout(5):
        while store._relay.owes < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _all_published(state: SqlStore, *command_ids: str) -> bool:
    records = [await state.get(command_id) for command_id in command_ids]
    return all(record is not None and record.published_at is not None for record in records)


class CountedReads(SqlStore):
    """A SQLite index that counts the commands the relay reads, or asks about."""

    asked = 0

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        self.asked += len(command_ids)
        return await super().deliverable(command_ids)

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        records = await super().unpublished(limit)
        self.asked += len(records)
        return records


async def test_a_large_owed_backlog_is_read_once_per_pass_not_once_per_publish_batch(
    tmp_path: Path,
) -> None:
    # 600 owed commands published 50 at a time: asking about all that is still owed before
    # each 50 read 4,500 records; reading only the outbox's next 50 reads each about once.
    state = CountedReads(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"))
    devices = [f"dev-{n}" for n in range(10)]
    async with store_on_index(state, relay_batch=50) as store:
        for device in devices:
            await store.ensure_queue(device)
        records = [
            store.build(device, None, f"{device}-{n}".encode(), 600)
            for n in range(60)
            for device in devices
        ]
        await state.add(records)
        assert store._relay is not None
        await store._relay.flush()  # whatever its start-up pass left
        state.asked = 0

        store._relay.owe(record.id for record in records)
        published = await store._relay.flush()

        assert published == len(records)
        assert state.asked <= 2 * len(records)
        for device in devices:
            assert await queue_depth(store, device) == 60
