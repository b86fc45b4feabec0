"""A change of one command on Redis decided in Python (confirm, cancel, an outcome): read
under WATCH, decided by the rule the caller passes, written in MULTI/EXEC, and decided again
when another client changed the command meanwhile.

An EXEC whose answer was lost (the connection closed or timed out after it was sent) may have
been written: Redis appends it to its AOF before it answers, and a shutdown in the same turn
of its event loop (SIGTERM), or a crash between the two, answers nobody. Raising StateError
then told the caller "not written" of a change Redis held: a confirm that "failed" let its
device get the command (tests/test_change_doubt.py). So the change is run again, retried
with jitter while Redis is away, for at most :data:`~amqp_queue.state.write_doubt.BOUND`
seconds: a change recognises its own earlier write (``indexed_store._OwnWriteAware``), so the
rerun either finds it or makes it, and the call returns; if Redis does not answer within the
bound, a StateError that says the outcome is unknown. A late copy of the lost EXEC cannot land
after a rerun that wrote: the rerun changed the key the copy's WATCH guards.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from . import write_doubt
from .clock import Clock
from .errors import StateError
from .fleet import Change
from .model import CommandRecord
from .redis_encoding import changed_fields, decode_record, encode_time
from .redis_lua import EXTEND_TTLS

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

logger = logging.getLogger("amqp_queue.state.redis")

# A confirm or cancel that keeps losing its optimistic transaction means something is wrong.
_MAX_WATCH_ATTEMPTS = 100


class RedisChanges:
    """``IndexedStore._modify`` on Redis (a mixin of
    :class:`~amqp_queue.state.redis_store.RedisStore`, which provides the rest)."""

    clock: Clock
    _client: Redis
    _indexes: list[str]
    _finished_ttl: int
    _prefix: str

    if TYPE_CHECKING:  # provided by RedisStore and its other mixins

        def _errors(self, action: str) -> AbstractAsyncContextManager[None]: ...

        def _command_key(self, command_id: str) -> str: ...

        def _device_key(self, device_id: str) -> str: ...

        def _slots_key(self, device_id: str) -> str: ...

        @property
        def _outcome_due_key(self) -> str: ...

        @property
        def _awaiting_key(self) -> str: ...

    async def _modify(self, command_id: str, change: Change) -> CommandRecord | None:
        try:
            return await self._modify_watched(command_id, change)
        except _ReplyLost as lost:
            failure = StateError(f"redis update failed: {lost.__cause__}")
            failure.__cause__ = lost.__cause__
        logger.warning("%s; running the change of %s again to find out", failure, command_id)
        try:
            return await write_doubt.within_bound(
                lambda: self._modify_watched(command_id, change), (StateError, _ReplyLost)
            )
        except (TimeoutError, StateError, _ReplyLost) as exc:
            raise write_doubt.unknown(failure, exc) from failure

    async def _modify_watched(self, command_id: str, change: Change) -> CommandRecord | None:
        from redis.exceptions import WatchError

        async with self._errors("update"), self._client.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_ATTEMPTS):
                try:
                    return await self._modify_once(pipe, command_id, change)
                except WatchError:
                    # Another client changed the command between WATCH and EXEC: decide again
                    # on what it wrote.
                    logger.debug("command %s changed concurrently; retrying", command_id)
        raise StateError(
            f"could not update command {command_id!r}: lost the race {_MAX_WATCH_ATTEMPTS} times"
        )

    def _expire_listed(self, pipe: Pipeline, key: str, record: CommandRecord) -> None:
        """The command's key kept for the retention from now, and the sets listing it (its
        device's history, its rollout) at least as long: a report may come long after
        their TTL was set (as the scripts' ``keep_listed`` does)."""
        pipe.pexpire(key, self._finished_ttl)
        listing = [f"{self._prefix}hist:{record.device_id}"]
        if record.rollout_id is not None:
            listing.append(f"{self._prefix}rollout:{record.rollout_id}")
        pipe.eval(EXTEND_TTLS, len(listing), *listing, self._finished_ttl)

    async def _modify_once(
        self, pipe: Pipeline, command_id: str, change: Change
    ) -> CommandRecord | None:
        """One optimistic attempt: read under WATCH, decide in Python, write in MULTI/EXEC."""
        key = self._command_key(command_id)
        await pipe.watch(key)
        fields = await pipe.hgetall(key)
        if not fields:
            return None
        _, current = decode_record(fields)
        updated = change(current)
        if updated is None:
            return current
        finishes = current.is_open and not updated.is_open
        slots_key = self._slots_key(current.device_id)
        kind = current.command_type
        frees_slot = False
        if finishes and kind is not None:
            await pipe.watch(slots_key)
            frees_slot = await pipe.hget(slots_key, kind) == command_id.encode()
        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        written, erased = changed_fields(current, updated)
        if written:
            pipe.hset(key, items=written)
        if erased:
            pipe.hdel(key, *erased)
        if finishes:
            ended_at = updated.ended_at or self.clock()
            pipe.zrem(self._device_key(current.device_id), command_id)
            pipe.zrem(self._indexes[0], command_id)
            pipe.zadd(self._indexes[2], {command_id: encode_time(ended_at)})
            self._expire_listed(pipe, key, current)
            if frees_slot and kind is not None:
                pipe.hdel(slots_key, kind)
        elif not updated.is_open and updated.pruned_after != current.pruned_after:
            # An outcome came: the command is final from now, its retention starts now.
            pipe.zrem(self._outcome_due_key, command_id)
            if updated.pruned_after is not None:
                pipe.zadd(self._indexes[2], {command_id: encode_time(updated.pruned_after)})
                self._expire_listed(pipe, key, current)
        if current.is_open and not current.is_ready and (updated.is_ready or finishes):
            pipe.zrem(self._awaiting_key, command_id)
        if updated.is_open and updated.is_ready and updated.published_at is None:
            pipe.zadd(self._indexes[1], {command_id: encode_time(updated.ready_at)})
        else:
            pipe.zrem(self._indexes[1], command_id)
        await _execute(pipe)
        return updated


class _ReplyLost(Exception):
    """An EXEC failed after it may have been sent: its change may be in (``__cause__`` says
    why)."""


async def _execute(pipe: Pipeline) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError

    lost = (RedisConnectionError, RedisTimeoutError, OSError)
    try:
        await pipe.execute()
    except WatchError as exc:
        # redis-py reports a connection lost under WATCH as a WatchError raised while
        # handling it; a watched key changed by another client is raised without one.
        if "while watching" in str(exc) and isinstance(exc.__context__, lost):
            raise _ReplyLost() from exc.__context__
        raise
    except lost as exc:
        raise _ReplyLost() from exc
