"""RedisStore's outcome deadlines, rollouts and retiring: their Lua scripts and the calls
that run them.

Each runs on the server in one atomic step, as every multi-key change of
:class:`~amqp_queue.state.redis_store.RedisStore` does; the key layout is in
:mod:`amqp_queue.state.redis_scripts`. A rollout's confirm or cancel and a retirement whose
reply was lost are run again (:mod:`amqp_queue.state.redis_rerun`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from datetime import datetime
from typing import TYPE_CHECKING, cast

from .model import CommandRecord, CommandStatus
from .redis_add_doubt import Args
from .redis_encoding import LIVENESS_FIELDS, as_text, decode_replies, is_live
from .redis_lua import PRELUDE, SWEEP_BATCH
from .redis_rerun import once, run_rerunnable

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript


TIME_OUT = (
    PRELUDE
    + """
-- ARGV[4]: batch size. Ends TIMED_OUT the delivered commands whose outcome deadline passed
-- and that have no outcome; they become final (pruned after the retention).
-- Returns {ended, examined}.
local due_key = prefix .. 'outcome_due'
local ids = redis.call('ZRANGEBYSCORE', due_key, '-inf', now, 'LIMIT', 0, ARGV[4])
local ended = 0
for _, id in ipairs(ids) do
    local key = command_key(id)
    local f = redis.call('HMGET', key, 'delivered', 'outcome')
    if f[1] == '1' and not f[2] then
        redis.call('HSET', key, 'outcome', 'timed_out', 'outcome_at', now)
        redis.call('ZADD', finished_key, now, id)
        redis.call('PEXPIRE', key, finished_ttl)
        keep_listed(key, finished_ttl)
        ended = ended + 1
    end
    redis.call('ZREM', due_key, id)
end
return {ended, #ids}
"""
)


CONFIRM_ROLLOUT = (
    PRELUDE
    + """
-- KEYS[4]: the rollout's set; ARGV[4]: who confirms ('' for nobody named). Confirms its live
-- commands awaiting confirmation; returns them (HGETALL replies). ARGV[5], ARGV[6]: the call's
-- token and how long (ms) its answer is kept (see redis_rerun).
local done_key = prefix .. 'done:' .. ARGV[5]
local done = redis.call('GET', done_key)
if done then
    return held_records(done)
end
local confirmed, ids = {}, {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local key = command_key(id)
    local f = redis.call('HMGET', key, 'delivered', 'end_reason', 'expires_at',
                         'requires_confirmation', 'confirmed', 'published_at')
    if is_live(f) and f[4] == '1' and f[5] == '0' then
        redis.call('HSET', key, 'confirmed', '1', 'confirmed_at', now)
        if ARGV[4] ~= '' then
            redis.call('HSET', key, 'confirmed_by', ARGV[4])
        end
        redis.call('ZREM', prefix .. 'awaiting', id)
        if not f[6] then
            redis.call('ZADD', outbox_key, now, id)
        end
        confirmed[#confirmed + 1] = redis.call('HGETALL', key)
        ids[#ids + 1] = id
    end
end
redis.call('SET', done_key, cjson.encode(ids), 'PX', ARGV[6])
return confirmed
"""
)

CANCEL_OPEN = (
    PRELUDE
    + """
-- KEYS[4]: a device's open set or a rollout's set; ARGV[4]: who cancels ('' for nobody
-- named). Ends its live commands CANCELLED; returns how many. ARGV[5], ARGV[6]: the call's
-- token and how long (ms) its answer is kept (see redis_rerun).
local done_key = prefix .. 'done:' .. ARGV[5]
local done = redis.call('GET', done_key)
if done then
    return tonumber(done)
end
local cancelled = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local key = command_key(id)
    if is_live(redis.call('HMGET', key, 'delivered', 'end_reason', 'expires_at')) then
        finish(key, id, 'end_reason', 'cancelled')
        if ARGV[4] ~= '' then
            redis.call('HSET', key, 'cancelled_by', ARGV[4])
        end
        cancelled = cancelled + 1
    end
end
redis.call('SET', done_key, cancelled, 'PX', ARGV[6])
return cancelled
"""
)

ROLLOUT_COUNTS = (
    PRELUDE
    + """
-- KEYS[4]: the rollout's set. Read-only. Returns status, count, status, count, ... as
-- rules.status_of decides each status; pruned members are skipped.
local counts = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local f = redis.call('HMGET', command_key(id), 'delivered', 'end_reason', 'expires_at',
                         'requires_confirmation', 'confirmed', 'outcome')
    local status = nil
    if f[1] == '1' then
        status = f[6] or 'delivered'
    elseif f[1] == '0' then
        if f[2] then
            status = f[2]
        elseif tonumber(f[3]) <= tonumber(now) then
            status = 'expired'
        elseif f[4] == '1' and f[5] ~= '1' then
            status = 'awaiting_confirmation'
        else
            status = 'pending'
        end
    end
    if status then
        counts[status] = (counts[status] or 0) + 1
    end
end
local flat = {}
for status, count in pairs(counts) do
    flat[#flat + 1] = status
    flat[#flat + 1] = count
end
return flat
"""
)


class RedisFleetCalls:
    """The rollout and retiring primitives of ``IndexedStore`` on Redis (a mixin of
    :class:`~amqp_queue.state.redis_store.RedisStore`, which provides the rest)."""

    _prefix: str
    _indexes: list[str]
    _client: Redis

    if TYPE_CHECKING:  # provided by RedisStore

        def _args(self, now: datetime, rest: Sequence[str | bytes] = ()) -> list[str | bytes]: ...

        def _args_when_sent(self, now: datetime, rest: Sequence[str | bytes]) -> Args: ...

        def _errors(self, action: str) -> AbstractAsyncContextManager[None]: ...

        def _device_key(self, device_id: str) -> str: ...

        async def _sweep(
            self, script: AsyncScript, now: datetime, args: Sequence[str | bytes], what: str
        ) -> int: ...

    def _register_fleet_scripts(self, client: Redis) -> None:
        self._time_out: AsyncScript = client.register_script(TIME_OUT)
        self._confirm_rollout_script: AsyncScript = client.register_script(CONFIRM_ROLLOUT)
        self._cancel_open_script: AsyncScript = client.register_script(CANCEL_OPEN)
        self._rollout_counts_script: AsyncScript = client.register_script(ROLLOUT_COUNTS)

    async def time_out(self, now: datetime) -> int:
        return await self._sweep(self._time_out, now, [str(SWEEP_BATCH)], "time out")

    @property
    def _outcome_due_key(self) -> str:
        return f"{self._prefix}outcome_due"

    def _rollout_key(self, rollout_id: str) -> str:
        return f"{self._prefix}rollout:{rollout_id}"

    async def _confirm_rollout(
        self, rollout_id: str, now: datetime, by: str | None = None
    ) -> list[CommandRecord]:
        confirmed = await run_rerunnable(
            self._client,
            self._confirm_rollout_script,
            [*self._indexes, self._rollout_key(rollout_id)],
            self._args_when_sent(now, [by or "", *once()]),
            "confirm rollout",
        )
        return [record for _, record in decode_replies(confirmed)]

    async def _cancel_open(
        self,
        now: datetime,
        *,
        device_id: str | None = None,
        rollout_id: str | None = None,
        by: str | None = None,
    ) -> int:
        members = (
            self._device_key(device_id)
            if device_id is not None
            else self._rollout_key(str(rollout_id))
        )
        cancelled = await run_rerunnable(
            self._client,
            self._cancel_open_script,
            [*self._indexes, members],
            self._args_when_sent(now, [by or "", *once()]),
            "cancel",
        )
        return int(cancelled)

    async def _rollout_enqueuer(self, rollout_id: str) -> tuple[bool, str | None]:
        # The first member still held answers (one call enqueued them all).
        async with self._errors("rollout read"):
            pages = self._rollout_fields(rollout_id, ["device_id", "enqueued_by"], page=100)
            async with aclosing(pages):
                async for _, values in pages:
                    for device_id, enqueued_by in values:
                        if device_id is not None:
                            return True, as_text(enqueued_by) if enqueued_by else None
        return False, None

    async def _rollout_unpublished(self, rollout_id: str, now: datetime) -> list[str]:
        found: list[str] = []
        async with self._errors("rollout read"):
            fields = [*LIVENESS_FIELDS, "published_at"]
            async for ids, values in self._rollout_fields(rollout_id, fields, page=500):
                found += [
                    command_id
                    for command_id, (*live, published_at) in zip(ids, values, strict=True)
                    if published_at is None and is_live(live, now)
                ]
        return found

    async def _rollout_fields(
        self, rollout_id: str, fields: list[str], *, page: int
    ) -> AsyncGenerator[tuple[list[str], list[list[bytes | None]]], None]:
        """The members of a rollout and ``fields`` of each, a page at a time (one pipelined
        round trip each). A pruned member stays listed in the rollout's set: its fields are
        None."""
        key, start = self._rollout_key(rollout_id), 0
        while members := await self._client.zrange(key, start, start + page - 1):
            # Without scores redis answers plain member names.
            ids = [as_text(cast(bytes, member)) for member in members]
            async with self._client.pipeline(transaction=False) as pipe:
                for command_id in ids:
                    pipe.hmget(f"{self._prefix}cmd:{command_id}", fields)
                values = await pipe.execute()
            yield ids, values
            start += page

    async def _rollout_counts(self, rollout_id: str, now: datetime) -> dict[CommandStatus, int]:
        async with self._errors("rollout summary"):
            flat = await self._rollout_counts_script(
                keys=[*self._indexes, self._rollout_key(rollout_id)], args=self._args(now)
            )
        return {
            CommandStatus(as_text(status)): int(count)
            for status, count in zip(flat[::2], flat[1::2], strict=True)
        }
