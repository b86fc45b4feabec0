"""A rollout's set and a device's history on Redis outlive every command they list.

Found by a probe (twenty-seventh session): the ``rollout:<id>`` and ``hist:<device>`` sets got
their TTL when a command was added, from the command's own TTL; a command's key lives on
longer once delivered with an outcome deadline (the deadline, then the retention) and
after a late outcome report. From the sets' expiry on, ``rollout_summary`` raised
``RolloutNotFound`` (or undercounted) and ``device_history`` left the command out, while
``get_status`` still answered for it: on SQL the three agree until the command is pruned.
Redis expires keys by its own clock, so the test reads the keys' lifetimes.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from redis.asyncio import Redis

from amqp_queue.state import CommandStatus, RedisStore
from tests.backends import REDIS_URL, redis_prefix

DEADLINE = timedelta(days=20)


async def lifetimes(client: Redis, *keys: str) -> list[int]:
    return [int(await client.pttl(key)) for key in keys]


async def test_a_delivered_rollout_member_awaiting_its_outcome_stays_listed() -> None:
    async with redis_prefix() as prefix, Redis.from_url(REDIS_URL) as client:
        store = RedisStore(client, prefix=prefix)
        rollout = await store.enqueue_many(["dev-1"], b"go", 60, outcome_timeout=DEADLINE)
        [command_id] = rollout.command_ids
        assert await store.drain_pending("dev-1") == [b"go"]

        command, members, history = await lifetimes(
            client,
            f"{prefix}cmd:{command_id}",
            f"{prefix}rollout:{rollout.rollout_id}",
            f"{prefix}hist:dev-1",
        )

        assert command > DEADLINE.total_seconds() * 1000
        assert members >= command - 1000
        assert history >= command - 1000
        summary = await store.rollout_summary(rollout.rollout_id)
        assert summary.counts[CommandStatus.DELIVERED] == summary.total == 1


async def test_a_command_reported_on_after_its_ttl_stays_listed() -> None:
    """A report restarts the command's retention from its time (its key lives on)."""
    async with redis_prefix() as prefix, Redis.from_url(REDIS_URL) as client:
        store = RedisStore(client, prefix=prefix)
        rollout = await store.enqueue_many(["dev-1"], b"go", 0.5)
        [command_id] = rollout.command_ids
        assert await store.drain_pending("dev-1") == [b"go"]
        await asyncio.sleep(1.0)  # the report comes after the TTL: its retention starts later
        await store.complete_command(command_id, b"done")

        command, members, history = await lifetimes(
            client,
            f"{prefix}cmd:{command_id}",
            f"{prefix}rollout:{rollout.rollout_id}",
            f"{prefix}hist:dev-1",
        )

        assert members >= command - 100
        assert history >= command - 100
        assert [record.id for record in await store.device_history("dev-1")] == [command_id]
