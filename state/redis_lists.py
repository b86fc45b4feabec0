"""RedisStore's fleet-wide lists: the confirmation inbox, the devices with open commands and
a device's history, read from the sorted sets ``P awaiting``, ``P devices`` and
``P hist:<device>`` (see :mod:`amqp_queue.state.redis_scripts`).

Each page reads its set from the cursor on, in slices, and checks every member's hash: a
member whose command expired (not swept yet) or was pruned is skipped, so the answer is
right even where a set still lists it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from .clock import Clock
from .model import CommandRecord, DeviceSummary, Position
from .redis_encoding import as_text, decode_record, encode_time

if TYPE_CHECKING:
    from redis.asyncio import Redis

_SLICE = 200
"""How many set members one round trip reads."""


class RedisLists:
    """The fleet-wide list calls of :class:`~amqp_queue.state.redis_store.RedisStore` (a
    mixin: RedisStore provides the client, the prefix and the rest)."""

    _prefix: str
    _client: Redis
    clock: Clock

    if TYPE_CHECKING:  # provided by RedisStore

        def _errors(self, action: str) -> AbstractAsyncContextManager[None]: ...

        async def open_commands(self, device_id: str) -> list[CommandRecord]: ...

    @property
    def _awaiting_key(self) -> str:
        return f"{self._prefix}awaiting"

    async def awaiting_confirmation(
        self,
        *,
        after: Position | None = None,
        limit: int = 100,
        device_prefix: str | None = None,
        command_type: str | None = None,
    ) -> list[CommandRecord]:
        now = self.clock()
        found: list[CommandRecord] = []
        low = "-inf" if after is None else encode_time(after[0])
        offset = 0
        async with self._errors("read confirmations"):
            while len(found) < limit:
                ids = await self._client.zrangebyscore(
                    self._awaiting_key, low, "+inf", start=offset, num=_SLICE
                )
                offset += len(ids)
                for record in await self._records(ids):
                    if after is not None and (record.created_at, record.id) <= after:
                        continue
                    if (
                        record.is_open
                        and not record.is_ready
                        and record.expires_at > now
                        and (device_prefix is None or record.device_id.startswith(device_prefix))
                        and (command_type is None or record.command_type == command_type)
                    ):
                        found.append(record)
                if len(ids) < _SLICE:
                    break
        # A set orders ties of a score by member, as (created_at, id) does.
        return found[:limit]

    async def devices_with_open(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[DeviceSummary]:
        summaries: list[DeviceSummary] = []
        low = "-" if after is None else f"({after}"
        key = f"{self._prefix}devices"
        while len(summaries) < limit:
            async with self._errors("read devices"):
                names = await self._client.zrangebylex(key, low, "+", start=0, num=_SLICE)
            for raw in names:
                device = as_text(raw)
                live = await self.open_commands(device)
                if live:
                    waiting = sum(not record.is_ready for record in live)
                    summaries.append(DeviceSummary(device, len(live) - waiting, waiting))
                    if len(summaries) == limit:
                        break
            if len(names) < _SLICE:
                break
            low = f"({as_text(names[-1])}"
        return summaries

    async def device_history(
        self, device_id: str, *, before: Position | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        found: list[CommandRecord] = []
        high = "+inf" if before is None else encode_time(before[0])
        key = f"{self._prefix}hist:{device_id}"
        offset = 0
        async with self._errors("read history"):
            while len(found) < limit:
                ids = await self._client.zrevrangebyscore(
                    key, high, "-inf", start=offset, num=_SLICE
                )
                offset += len(ids)
                for record in await self._records(ids):
                    if before is None or (record.created_at, record.id) < before:
                        found.append(record)
                if len(ids) < _SLICE:
                    break
        return found[:limit]

    async def _records(self, ids: Sequence[Any]) -> list[CommandRecord]:
        """The records of these ids in their order; ids whose hash is gone are skipped."""
        if not ids:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for command_id in ids:
                pipe.hgetall(f"{self._prefix}cmd:{as_text(command_id)}")
            replies = await pipe.execute()
        return [decode_record(fields)[1] for fields in replies if fields]
