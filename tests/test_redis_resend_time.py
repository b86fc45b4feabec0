"""A Redis script the client sends again after a lost link decides expiry with the time of
the send that ran, not of the first.

Found by a probe (twenty-sixth session), documented then and not fixed: a ``RedisStore`` on a
client that sends a command again after a lost link (``redis.asyncio.Redis(host=...)``
retries, with back-off, up to ten times) sent a drain's hand-over again with the arguments
made for the first send, the time among them. A hand-over lost before it reached Redis and
sent again after a command's expiry handed that command out, after every reader had seen it
``EXPIRED``; an add sent again so ended an expired command ``SUPERSEDED``. The store now sends
again itself, the arguments made anew each time.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis

from amqp_queue.state import CommandStatus, RedisStore, StateError
from amqp_queue.state.redis_add_scripts import ADD
from amqp_queue.state.redis_claim_scripts import HAND_OVER
from tests.backends import REDIS_URL, redis_prefix
from tests.tcp_proxy import LosesRequest

TTL = 0.5
HOLD = 1.0  # the lost request's link dies this long after it was sent: past the TTL


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


@asynccontextmanager
async def resending_store(script: str) -> AsyncIterator[tuple[RedisStore, LosesRequest]]:
    """A store on a client that sends a command again after a lost link, through a proxy
    that loses the first request running ``script`` once armed."""
    async with redis_prefix() as prefix, LosesRequest(6379) as proxy:
        async with Redis.from_url(REDIS_URL) as direct:
            await direct.script_load(script)  # the EVALSHA the proxy watches for
        client = Redis(host="127.0.0.1", port=proxy.port)
        try:
            yield RedisStore(client, prefix=prefix), proxy
        finally:
            await client.aclose()


async def test_a_hand_over_sent_again_past_a_commands_expiry_hands_nothing_out() -> None:
    async with resending_store(HAND_OVER) as (store, proxy):
        command = await store.enqueue("dev-1", b"short-lived", TTL)
        proxy.arm(sha(HAND_OVER), hold=HOLD)

        drained = await store.drain_pending("dev-1")

        assert proxy.lost.is_set()
        assert drained == []
        assert await store.get_status(command) is CommandStatus.EXPIRED


async def test_an_add_sent_again_past_the_replaced_commands_expiry_does_not_supersede_it() -> None:
    async with resending_store(ADD) as (store, proxy):
        old = await store.enqueue_or_update("dev-1", "config", b"old", TTL)
        proxy.arm(sha(ADD), hold=HOLD)

        new = await store.enqueue_or_update("dev-1", "config", b"new", 600)

        assert proxy.lost.is_set()
        assert await store.get_status(old) is CommandStatus.EXPIRED
        assert await store.get_status(new) is CommandStatus.PENDING
        assert await store.drain_pending("dev-1") == [b"new"]


async def test_a_link_lost_for_good_still_fails_the_call_clearly() -> None:
    """Sending again is bounded as the client's own policy bounds it."""
    async with resending_store(HAND_OVER) as (store, proxy):
        command = await store.enqueue("dev-1", b"kept", 600)

        async def cut_for_good() -> None:
            await proxy.lost.wait()
            await proxy.cut()

        cutting = asyncio.ensure_future(cut_for_good())
        proxy.arm(sha(HAND_OVER), hold=0.0)
        with pytest.raises(StateError):
            await store.drain_pending("dev-1")
        await cutting
        await proxy.restore()

        # Not handed out, nor lost: open, for a drain once its claim is given back.
        assert await store.get_status(command) is CommandStatus.PENDING
