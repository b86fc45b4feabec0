"""A hand-over of several claims decides each claim's expiry with the time that claim's
hand-over begins, not the time the first one began.

Found by a review (twenty-sixth session): ``hand_over`` read its time once, and a later
claim's hand-over that waited behind an earlier one (for the Redis pool's only connection
here; for a busy event loop or another writer's lock) was sent with that time, and handed
out a command that had expired meanwhile, after readers saw ``EXPIRED``. A deep drain hands
over several claims (one per window), and so does a drain that looked up a lost claim.
"""

from __future__ import annotations

import asyncio

from amqp_queue import CommandStatus
from amqp_queue.state import RedisStore
from tests.backends import REDIS_URL, redis_prefix

TTL = 1.0


async def test_a_later_claims_hand_over_that_waited_hands_out_nothing_expired() -> None:
    async with (
        redis_prefix() as prefix,
        await RedisStore.connect(REDIS_URL, prefix=prefix, max_connections=1) as store,
    ):
        kept = await store.enqueue("dev-1", b"kept", 600)
        short = await store.enqueue("dev-1", b"short", TTL)
        # Two claims, as a deep drain's windows.
        claimed = [*await store.claim("dev-1", [kept]), *await store.claim("dev-1", [short])]
        await asyncio.sleep(0.3)
        # The pool's only connection is busy past the short command's expiry.
        busy = asyncio.ensure_future(store.client.blpop([f"{prefix}nothing"], timeout=TTL))
        await asyncio.sleep(0.05)

        handed = await store.hand_over(claimed)

        await busy
        assert [record.payload for record in handed] == [b"kept"]
        assert await store.get_status(short) == CommandStatus.EXPIRED
