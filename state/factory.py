"""Opens a state backend from a URL, so deployments choose one by configuration."""

from __future__ import annotations

from datetime import timedelta

from state.base import DEFAULT_RETENTION, IndexedStore
from state.clock import Clock, utc_now
from state.memory import MemoryStore
from state.redis_store import RedisStore
from state.sql import SqlStore
from state.validation import DEFAULT_LIMITS, Limits

DEFAULT_STATE_URL = "sqlite+aiosqlite:///commands.db"


async def open_state(
    url: str = DEFAULT_STATE_URL,
    *,
    limits: Limits = DEFAULT_LIMITS,
    clock: Clock = utc_now,
    retention: timedelta = DEFAULT_RETENTION,
) -> IndexedStore:
    """The state backend named by ``url``; the caller closes it.

    ``sqlite+aiosqlite://...`` and ``postgresql+asyncpg://...`` open a :class:`SqlStore`
    (``?schema=`` is not a SQLAlchemy option; use :class:`SqlStore` directly for a schema),
    ``memory://`` a :class:`MemoryStore` (nothing persists: only when asked for explicitly),
    ``redis://...`` and ``rediss://...`` a :class:`RedisStore` (``?prefix=`` sets its key
    prefix).

    Raises:
        ValueError: the URL names no known backend.
        StateError: the backend cannot be reached.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryStore(limits=limits, clock=clock, retention=retention)
    if scheme.startswith(("sqlite", "postgresql")):
        return await SqlStore.connect(url, limits=limits, clock=clock, retention=retention)
    if scheme in ("redis", "rediss"):
        return await RedisStore.connect(url, limits=limits, clock=clock, retention=retention)
    raise ValueError(f"no state backend for URL {url!r} (sqlite, postgresql, redis, memory)")
