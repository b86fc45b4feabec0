"""A direct publish's mark rides along with the next enqueue's index write.

Marked in a transaction of its own at once, every sequential enqueue waited behind the
previous command's publish mark: two commits per enqueue on the index's one writer where
one does (bench: decompose, latency). The marks must all land all the same: a mark that
never lands leaves its command to another process's relay, which publishes it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest

from amqp_queue.state import (
    CommandRecord,
    IndexedStore,
    Limits,
    QueueFull,
    RedisStore,
    SqlStore,
    StateError,
)
from tests.rabbitmq_support import queue_depth
from tests.shared_index import INDEX_KINDS, drain_until, shared_index

DEVICE = "dev-marks"
COMMANDS = 20


class _CountedSql(SqlStore):
    writes: list[tuple[int, int]]

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        self.writes.append((len(records), len(published)))
        return await super().write(records, published)


class _CountedRedis(RedisStore):
    writes: list[tuple[int, int]]

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        self.writes.append((len(records), len(published)))
        return await super().write(records, published)


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_sequential_enqueues_write_once_each_and_every_mark_lands(
    kind: str, tmp_path: Path
) -> None:
    # relay_after=0: a command left unmarked is an orphan at once for the second store.
    async with shared_index(kind, tmp_path, relay_after=0) as shared:
        counted: IndexedStore = await shared.open_index(
            _CountedSql if kind != "redis" else _CountedRedis
        )
        assert isinstance(counted, _CountedSql | _CountedRedis)
        counted.writes = []
        async with shared.store(counted) as producer:
            await producer.ensure_queue(DEVICE)
            for n in range(COMMANDS):
                await producer.enqueue(DEVICE, f"c{n}".encode(), 600)
                # The caller does something else between its enqueues (a device's loop
                # body, a request): the previous mark must still wait for the next write.
                await asyncio.sleep(0.002)
        writes = list(counted.writes)
        # Closed: every publish mark has landed, so another store's relay finds no orphan.
        async with shared.store(await shared.open_index()) as other:
            await other.relay_outbox()
            assert await queue_depth(other, DEVICE) == COMMANDS

    assert len(writes) <= COMMANDS + 1, writes
    assert sum(marks for _, marks in writes) == COMMANDS
    assert sum(records for records, _ in writes) == COMMANDS


LIMIT = 3


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_an_enqueue_refused_at_the_limit_leaves_the_riding_marks_landed(
    kind: str, tmp_path: Path
) -> None:
    """The enqueue past a device's limit (rule 11) fails alone: the publish mark of the
    command before it, riding along with its write, still lands, so no relay publishes that
    command a second time."""
    async with shared_index(kind, tmp_path, relay_after=0) as shared:
        index = await shared.open_index(limits=Limits(max_pending_per_device=LIMIT))
        async with shared.store(index) as producer:
            await producer.ensure_queue(DEVICE)
            for n in range(LIMIT):
                await producer.enqueue(DEVICE, f"c{n}".encode(), 600)
            with pytest.raises(QueueFull):
                await producer.enqueue(DEVICE, b"over the limit", 600)
        # Closed: every publish mark has landed, so another store's relay finds no orphan.
        async with shared.store(await shared.open_index()) as other:
            await other.relay_outbox()
            assert await queue_depth(other, DEVICE) == LIMIT


class _RefusedThenAnswerLost(SqlStore):
    """Refuses the next batch that carries marks (as a device at its limit would), then
    writes its record alone and loses the answer."""

    trap = False

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        if self.trap and records and published:
            raise QueueFull("refused as a batch")
        if self.trap and records:
            self.trap = False
            await super().write(records, published)
            raise StateError("the answer was lost")
        return await super().write(records, published)


async def test_a_record_written_alone_after_a_refusal_with_its_answer_lost_is_not_overtaken(
    tmp_path: Path,
) -> None:
    """Written again alone after its batch was refused, a record whose write landed with its
    answer lost is owed to the relay (as in a batch), so the next enqueue is not published
    ahead of it."""
    async with shared_index("sqlite", tmp_path, relay_after=30) as shared:
        index = await shared.open_index(_RefusedThenAnswerLost)
        assert isinstance(index, _RefusedThenAnswerLost)
        async with shared.store(index) as producer:
            await producer.ensure_queue(DEVICE)
            await producer.enqueue(DEVICE, b"c0", 600)  # its publish mark rides along next
            index.trap = True
            with pytest.raises(StateError):
                await producer.enqueue(DEVICE, b"c1", 600)
            await producer.enqueue(DEVICE, b"c2", 600)
            got = await drain_until(producer, DEVICE, count=3, seconds=5)

    assert got == [b"c0", b"c1", b"c2"]
