"""A bare ``RedisStore`` decides expiry with the time its script is sent, not the time the
call read before it waited for a connection (or for a busy event loop).

Found by a helper's probe (twenty-fourth session, not fixed then): with 25 status pollers
loading the event loop, a drain that began just before its command's expiry handed it over
up to 185 ms after it, after a reader had seen ``EXPIRED``; and a replacement could end an
expired command ``SUPERSEDED``. Here the loop stalls right after the call reads its time,
while its connection is being opened (as after an idle spell).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

from amqp_queue import CommandStatus
from amqp_queue.state import CommandRecord, RedisStore
from tests.backends import REDIS_URL, redis_prefix

TTL = 0.3
STALL = TTL + 0.3


class _StallingStore(RedisStore):
    """Stalls the event loop once, just after the armed call reads its time."""

    stall_in_add = False
    stall_after_claim = False

    def _stall_after_next_read(self) -> None:
        clock = self.clock

        def read_then_stall() -> datetime:
            self.clock = clock
            asyncio.get_running_loop().call_soon(time.sleep, STALL)
            return clock()

        self.clock = read_then_stall

    async def add(self, records: Sequence[CommandRecord]) -> int:
        if self.stall_in_add:
            self.stall_in_add = False
            await self._client.connection_pool.disconnect()
            self._stall_after_next_read()
        return await super().add(records)

    async def _claim(
        self, device_id: str, now: datetime, command_ids: Collection[str] | None
    ) -> list[CommandRecord]:
        taken = await super()._claim(device_id, now, command_ids)
        if self.stall_after_claim:
            self.stall_after_claim = False
            # The hand-over's time is read next, then its connection opened.
            await self._client.connection_pool.disconnect()
            self._stall_after_next_read()
        return taken


@asynccontextmanager
async def _stores() -> AsyncIterator[tuple[_StallingStore, RedisStore]]:
    """The stalling store, and a reader of the same keys on a client of its own."""
    async with (
        redis_prefix() as prefix,
        await _StallingStore.connect(REDIS_URL, prefix=prefix) as store,
        await RedisStore.connect(REDIS_URL, prefix=prefix) as reader,
    ):
        assert isinstance(store, _StallingStore)
        yield store, reader


async def test_a_drain_whose_hand_over_was_delayed_past_the_ttl_hands_nothing_out() -> None:
    async with _stores() as (store, reader):
        command_id = await store.enqueue("dev-1", b"x", TTL)
        store.stall_after_claim = True

        drained = await store.drain_pending("dev-1")

        assert drained == []
        assert await reader.get_status(command_id) == CommandStatus.EXPIRED


async def test_a_replacement_delayed_past_the_old_commands_ttl_leaves_it_expired() -> None:
    async with _stores() as (store, reader):
        old = await store.enqueue_or_update("dev-1", "unlock", b"old", TTL)
        store.stall_in_add = True

        new = await store.enqueue_or_update("dev-1", "unlock", b"new", 60)

        assert await reader.get_status(old) == CommandStatus.EXPIRED
        assert await reader.get_status(new) == CommandStatus.PENDING
        assert await store.drain_pending("dev-1") == [b"new"]
