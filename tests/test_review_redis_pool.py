"""Review of d09600c (Redis: BlockingConnectionPool): ``client_options`` used to go to
``redis.asyncio.Redis.from_url`` and now go to ``BlockingConnectionPool.from_url``, whose
unknown keywords reach each connection. A client-level option that used to work now fails
connect() with a bare TypeError (not a StateError)."""

from __future__ import annotations

from amqp_queue.state.redis_store import RedisStore
from tests.backends import redis_prefix


async def test_a_client_level_option_is_still_accepted() -> None:
    async with redis_prefix() as prefix:
        store = await RedisStore.connect(
            f"redis://127.0.0.1:6379/0?prefix={prefix}", single_connection_client=True
        )
        await store.close()
