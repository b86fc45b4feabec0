"""A drain's hand-over sent again after its reply was lost answers as the first run did.

Found by a review (twenty-sixth session), on the code before it too: a ``RedisStore`` on a
client that sends a command again after a lost reply (``redis.asyncio.Redis(host=...)``, as
docs/stores.md builds one, retries by default) had its hand-over run twice when the link
died after Redis ran it. The second run found the commands delivered already and answered
none: the drain returned nothing, the commands read ``DELIVERED`` and no drain ever returned
them. A hand-over now also answers the commands its own claim delivered (they keep that
claim's ``claimed_until``).
"""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis

from amqp_queue.state import CommandStatus, RedisStore
from amqp_queue.state.redis_claim_scripts import HAND_OVER
from tests.backends import REDIS_URL, redis_prefix
from tests.tcp_proxy import LosesAnswer


async def test_a_hand_over_resent_after_its_reply_was_lost_returns_its_commands() -> None:
    async with redis_prefix() as prefix, LosesAnswer(6379) as proxy:
        # Loaded ahead: the EVALSHA the proxy watches for then runs the script at once.
        async with Redis.from_url(REDIS_URL) as direct:
            await direct.script_load(HAND_OVER)
        client = Redis(host="127.0.0.1", port=proxy.port)  # sends again after a lost reply
        store = RedisStore(client, prefix=prefix)
        try:
            ids = [await store.enqueue("dev-1", b"c%d" % n, 600) for n in range(3)]
            proxy.arm(hashlib.sha1(HAND_OVER.encode()).hexdigest().encode())

            drained = await store.drain_pending("dev-1")  # the client sends it again

            assert proxy.lost.is_set()
            assert drained == [b"c0", b"c1", b"c2"]
            assert await store.drain_pending("dev-1") == []
            assert [await store.get_status(i) for i in ids] == [CommandStatus.DELIVERED] * 3
        finally:
            await client.aclose()
