"""RedisStore: the state index on Redis (redis-py's asyncio client).

Commands are hashes with a sorted-set index per device, as in the reference design. Every
change that touches more than one key runs on the server in one atomic step: replacement by
type, drains, expiry, delivery marks and the outbox are Lua scripts
(:mod:`amqp_queue.state.redis_scripts`); confirm and cancel run their rule in Python inside a
WATCH/MULTI
transaction that retries when another client changed the command meanwhile
(:mod:`amqp_queue.state.redis_changes`).

Expiry is decided at read time from the stored ``expires_at`` and the store's clock. Key TTLs
only stop abandoned keys from piling up: they are computed from the store's clock and are a
day longer than the command's remaining life plus the retention, so Redis never drops a
command that the store still considers live or queryable.

redis-py is an optional dependency (the ``redis`` extra): it is imported where it is used,
so ``import amqp_queue.state`` works without it.

Durability is Redis's: with AOF (``appendfsync always`` or ``everysec``) commands survive a
restart of Redis; with persistence off they are lost with it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import redis_add_scripts as add_lua
from . import redis_claim_scripts as claim_lua
from . import redis_scripts as lua
from . import rules
from .cancellation import cancellation_kept
from .clock import Clock, utc_now
from .clock import advancing as clock_advancing
from .errors import QueueFull, StateError
from .indexed_store import DEFAULT_RETENTION, IndexedStore
from .model import CommandRecord
from .redis_add_doubt import Args, add_once
from .redis_changes import RedisChanges
from .redis_claims import Claims
from .redis_drain_claims import RedisDrainClaims
from .redis_encoding import (
    LIVENESS_FIELDS,
    add_arguments,
    as_text,
    decode_record,
    decode_replies,
    encode_time,
    is_live,
    milliseconds,
)
from .redis_fleet import RedisFleetCalls
from .redis_lists import RedisLists
from .redis_lua import SWEEP_BATCH
from .validation import DEFAULT_LIMITS, Limits

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("amqp_queue.state.redis")

DEFAULT_PREFIX = "amqp_queue:"
# Connections a store opens at most (redis-py's default), and the seconds a call waits for a
# free one before it fails with StateError.
POOL_SIZE, POOL_WAIT = 100, 10.0
# How much longer than the store needs them Redis keeps keys: room for clock skew between
# the store's clock and Redis's, never a reason to expire a key early.
KEY_TTL_MARGIN = timedelta(days=1)


class RedisStore(RedisChanges, RedisLists, RedisFleetCalls, RedisDrainClaims, IndexedStore):
    """The command store on Redis.

    Args:
        client: a ``redis.asyncio.Redis`` with ``decode_responses=False`` (payloads are
            bytes). The caller keeps ownership; ``close()`` leaves it open. Use
            :meth:`connect` to have the store create and own its client.
        prefix: prepended to every key, so several stores share one Redis database.
        limits, clock, retention: see :class:`amqp_queue.state.indexed_store.IndexedStore`.

    Raises:
        ValueError: the client decodes responses to str.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
    ) -> None:
        super().__init__(limits=limits, clock=clock, retention=retention)
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client with decode_responses=False")
        self._client = client
        self._owns_client = False
        self._prefix = prefix
        self._indexes = [f"{prefix}expiry", f"{prefix}outbox", f"{prefix}finished"]
        self._finished_ttl = milliseconds(retention + KEY_TTL_MARGIN)
        register = client.register_script
        self._add = register(add_lua.ADD)
        self._add_lookup = register(add_lua.ADD_LOOKUP)
        self._claim_script = register(claim_lua.CLAIM)
        self._hand_over_script = register(claim_lua.HAND_OVER)
        self._end_claims_script = register(claim_lua.END_CLAIMS)
        self._claims = Claims()
        self._mark_delivered = register(lua.MARK_DELIVERED)
        self._expire = register(lua.EXPIRE)
        self._prune = register(lua.PRUNE)
        self._open_commands = register(lua.OPEN_COMMANDS)
        self._unpublished = register(lua.UNPUBLISHED)
        self._mark_published = register(lua.MARK_PUBLISHED)
        self._release_script = register(lua.RELEASE)
        self._reject = register(lua.REJECT)
        self._relay_lease = register(lua.RELAY_LEASE)
        self._register_fleet_scripts(client)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        prefix: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
        **client_options: Any,
    ) -> RedisStore:
        """Connects to the Redis at ``url`` (``redis://`` or ``rediss://``) and checks it answers.

        The store owns the client and closes it on ``close()``.

        Args:
            url: a redis-py URL; an optional ``prefix`` query parameter (``?prefix=app1:``)
                sets the key prefix when the ``prefix`` argument is not given.
            prefix: the key prefix; default: the URL's, else ``amqp_queue:``.
            limits, clock, retention: see :class:`amqp_queue.state.indexed_store.IndexedStore`.
            client_options: passed on to redis-py's ``BlockingConnectionPool.from_url``:
                ``max_connections`` (default :data:`POOL_SIZE`), ``timeout`` (seconds a call
                waits for a free connection, default :data:`POOL_WAIT`), socket options.

        Raises:
            StateError: Redis cannot be reached.
        """
        from redis.asyncio import BlockingConnectionPool, Redis

        url, url_prefix = _split_prefix(url)
        prefix = prefix if prefix is not None else url_prefix or DEFAULT_PREFIX
        # redis-py's default pool refuses a call at once when every connection is in use:
        # hundreds of streams' liveness checks failed ("Too many connections").
        options = {"max_connections": POOL_SIZE, "timeout": POOL_WAIT, **client_options}
        single = bool(options.pop("single_connection_client", False))  # the client's own
        pool = BlockingConnectionPool.from_url(url, **options)
        client = Redis(connection_pool=pool, single_connection_client=single)
        client.auto_close_connection_pool = True
        try:
            store = cls(client, prefix=prefix, limits=limits, clock=clock, retention=retention)
            async with store._errors("ping"):
                await client.ping()
        except BaseException:
            await client.aclose()
            raise
        store._owns_client = True
        at = [pool.connection_kwargs.get(key) for key in ("host", "port", "db")]
        logger.info("state index on Redis %s:%s/%s, key prefix %r", *at, prefix)
        return store

    @property
    def client(self) -> Redis:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    async def close(self) -> None:
        # Last chance: once closed, nobody knows these claims were in doubt.
        await self._settle_all_claims()
        if self._owns_client:
            await self._client.aclose()

    # -- primitives ----------------------------------------------------------------------

    async def add(self, records: Sequence[CommandRecord]) -> int:
        if not records:
            return 0
        now = self.clock()
        args: list[str | bytes] = []
        for record in records:
            key_ttl = record.expires_at - now + self.retention + KEY_TTL_MARGIN
            args += add_arguments(record, key_ttl)
        limit = str(self.limits.max_pending_per_device)
        # A lost reply is resolved before answering: an error means nothing was written.
        superseded = await add_once(
            self._client,
            self._add,
            self._add_lookup,
            [*self._indexes, f"{self._prefix}seq"],
            self._args_when_sent(now, [limit, *args]),
            self._args(now),
            [record.id for record in records],
        )
        if isinstance(superseded, list):
            raise QueueFull(as_text(superseded[1]), self.limits.max_pending_per_device)
        return int(superseded)

    async def get(self, command_id: str) -> CommandRecord | None:
        async with self._errors("get"):
            fields = await self._client.hgetall(self._command_key(command_id))
        return decode_record(fields)[1] if fields else None

    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        async with self._errors("read"):
            found = await self._open_commands(
                keys=[*self._indexes, self._device_key(device_id)], args=self._args(self.clock())
            )
        return [record for _, record in decode_replies(found)]

    async def _release(self, claims: Mapping[str, datetime], *, unpublish: bool) -> int:
        keep = milliseconds(self.retention + KEY_TTL_MARGIN)
        args: list[str | bytes] = ["1" if unpublish else "0", str(keep)]
        for command_id, claimed_until in claims.items():
            args += [command_id, encode_time(claimed_until)]
        async with self._errors("release"):
            reopened = await self._release_script(
                keys=self._indexes, args=self._args(self.clock(), args)
            )
        return int(reopened)

    async def _hold_outbox(self, owner: str) -> str:
        key = f"{self._prefix}outbox-owner"
        async with self._errors("outbox owner"):
            await self._client.set(key, owner, nx=True)
            holder = await self._client.get(key)
        if holder is None:
            return owner
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    async def _hold_relay(self, holder: str, now: datetime, until: datetime) -> bool:
        async with self._errors("relay lease"):
            held = await self._relay_lease(
                keys=[f"{self._prefix}relay-lease"],
                args=[holder, encode_time(now), encode_time(until)],
            )
        return bool(held)

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        if not command_ids:
            return {}
        async with self._errors("read"):
            records = await self._records(list(command_ids))
        # Commands of a device this process's lost claim may have taken: given back first.
        doubtful = set(self._claims.in_doubt()).intersection(r.device_id for r in records)
        for device_id in doubtful:
            await self._settle_claims(device_id)
        if doubtful:
            async with self._errors("read"):
                records = await self._records(list(command_ids))
        now = self.clock()
        return {record.id: record for record in records if rules.is_deliverable(record, now)}

    async def is_deliverable(self, command_id: str) -> bool:
        async with self._errors("read"):
            values = await self._client.hmget(self._command_key(command_id), LIVENESS_FIELDS)
        return is_live(values, self.clock())

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        if not command_ids:
            return 0
        async with self._errors("mark delivered"):
            marked = await self._mark_delivered(
                keys=self._indexes, args=self._args(self.clock(), list(command_ids))
            )
        return int(marked)

    async def expire(self, now: datetime) -> int:
        return await self._sweep(self._expire, now, [str(SWEEP_BATCH)], "expire")

    async def prune(self, before: datetime) -> int:
        args = [encode_time(before), str(SWEEP_BATCH)]
        return await self._sweep(self._prune, self.clock(), args, "prune")

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        if limit <= 0:
            return []
        # Each relay pass gives back what claims in doubt took, not left delivered to nobody.
        await self._settle_all_claims()
        async with self._errors("read outbox"):
            found = await self._unpublished(
                keys=self._indexes, args=self._args(self.clock(), [str(limit)])
            )
        # Ready order, ties by write order (decode_replies sorts by write order; stable).
        records = rules.in_ready_order(record for _, record in decode_replies(found))
        return records[:limit]

    async def mark_published(self, command_ids: Collection[str]) -> None:
        if not command_ids:
            return
        async with self._errors("mark published"):
            await self._mark_published(
                keys=self._indexes, args=self._args(self.clock(), list(command_ids))
            )

    async def reject(self, command_ids: Collection[str]) -> int:
        if not command_ids:
            return 0
        async with self._errors("reject"):
            rejected = await self._reject(
                keys=self._indexes, args=self._args(self.clock(), list(command_ids))
            )
        return int(rejected)

    # -- helpers -------------------------------------------------------------------------

    async def _sweep(
        self, script: AsyncScript, now: datetime, args: Sequence[str | bytes], what: str
    ) -> int:
        """Runs a batched sweep script until it finds nothing more; returns its total."""
        total = 0
        async with self._errors(what):
            while True:
                done, examined = await script(keys=self._indexes, args=self._args(now, args))
                total += int(done)
                if int(examined) < SWEEP_BATCH:
                    return total

    def _args(self, now: datetime, rest: Sequence[str | bytes] = ()) -> list[str | bytes]:
        """The leading arguments every script takes (see :mod:`amqp_queue.state.redis_scripts`)."""
        return [self._prefix, encode_time(now), str(self._finished_ttl), *rest]

    def _args_when_sent(self, now: datetime, rest: Sequence[str | bytes]) -> Args:
        """:meth:`_args` with ``now`` advanced to when they are made, once the script's
        connection is held (see ``redis_add_doubt.send_once``): a call delayed by the pool or
        a busy event loop past a command's TTL finds it expired, as readers saw it."""
        advancing = clock_advancing(self.clock, now)
        return lambda: self._args(advancing(), rest)

    def _command_key(self, command_id: str) -> str:
        return f"{self._prefix}cmd:{command_id}"

    def _device_key(self, device_id: str) -> str:
        return f"{self._prefix}dev:{device_id}"

    def _slots_key(self, device_id: str) -> str:
        return f"{self._prefix}types:{device_id}"

    @asynccontextmanager
    async def _errors(self, action: str) -> AsyncIterator[None]:
        """Redis's failures as StateError; a cancellation redis-py dropped raised again
        (see :mod:`~amqp_queue.state.cancellation`)."""
        from redis.exceptions import RedisError

        try:
            with cancellation_kept():
                yield
        except (RedisError, OSError) as exc:
            raise StateError(f"redis {action} failed: {exc}") from exc


def _split_prefix(url: str) -> tuple[str, str | None]:
    """Splits the optional ``prefix`` query parameter off a Redis URL (redis-py refuses it)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), (prefixes[-1] if prefixes else None)
