"""Opens a state backend from a URL, so deployments choose one by configuration."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import parse_qsl

from sqlalchemy.engine import make_url

from .clock import Clock, utc_now
from .indexed_store import DEFAULT_RETENTION, IndexedStore
from .memory import MemoryStore
from .redis_store import RedisStore
from .sql import SqlStore, create_engine
from .sql.schema_versions import HEAD, SchemaChange
from .validation import DEFAULT_LIMITS, Limits

DEFAULT_STATE_URL = "sqlite+aiosqlite:///commands.db"

# A PostgreSQL identifier as written unquoted (ASCII), at most NAMEDATALEN - 1 bytes long.
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


async def open_state(
    url: str = DEFAULT_STATE_URL,
    *,
    limits: Limits = DEFAULT_LIMITS,
    clock: Clock = utc_now,
    retention: timedelta = DEFAULT_RETENTION,
) -> IndexedStore:
    """The state backend named by ``url``; the caller closes it.

    ``sqlite+aiosqlite://...`` and ``postgresql+asyncpg://...`` open a :class:`SqlStore`;
    on a PostgreSQL URL ``?schema=<name>`` puts its table in that (existing) schema, as
    ``SqlStore.connect(url, schema=name)`` does, e.g.
    ``postgresql+asyncpg://app@db/commands?schema=queue``. ``memory://`` opens a
    :class:`MemoryStore` (nothing persists: only when asked for explicitly),
    ``redis://...`` and ``rediss://...`` a :class:`RedisStore` (``?prefix=`` sets its key
    prefix).

    Raises:
        ValueError: the URL names no known backend, or ``?schema=`` is not one PostgreSQL
            identifier (ASCII letters, digits and underscores, not starting with a digit, at
            most 63 characters) or is given on a URL other than PostgreSQL's.
        StateError: the backend cannot be reached.
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryStore(limits=limits, clock=clock, retention=retention)
    if scheme.startswith(("sqlite", "postgresql")):
        url, schema = _split_schema(url)
        return await SqlStore.connect(
            url, schema=schema, limits=limits, clock=clock, retention=retention
        )
    if scheme in ("redis", "rediss"):
        return await RedisStore.connect(url, limits=limits, clock=clock, retention=retention)
    raise ValueError(f"no state backend for URL {url!r} (sqlite, postgresql, redis, memory)")


async def migrate_state(url: str, revision: str = HEAD) -> SchemaChange:
    """Brings the schema of the SQL state index at ``url`` to ``revision`` (``amqp-queue
    migrate``).

    Opening the index does the same to the head on its own (see ``SqlStore.create_table``);
    this does it ahead of a deploy, or back to an older revision before an older release
    runs. ``?schema=`` on a PostgreSQL URL names the schema, as for :func:`open_state`.

    Args:
        url: a ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://`` state URL.
        revision: ``head`` (this release's schema) or an older revision.

    Returns:
        The revision before (None for an empty database) and after.

    Raises:
        ValueError: not a SQL state URL, a bad ``?schema=``, or an unknown revision.
        StateError: the database cannot be reached or changed, or a newer release upgraded
            its schema beyond what this one knows.
    """
    scheme = url.split(":", 1)[0].lower()
    if not scheme.startswith(("sqlite", "postgresql")):
        # The scheme only: the rest of a URL may hold a password.
        raise ValueError(
            f"only a SQL state index (sqlite, postgresql) has schema versions: {scheme}"
        )
    url, schema = _split_schema(url)
    engine = create_engine(url)
    try:
        async with SqlStore(engine, schema=schema) as store:
            return await store.migrate(revision)
    finally:
        await engine.dispose()


def _split_schema(url: str) -> tuple[str, str | None]:
    """The SQL URL without its ``?schema=`` option, and the schema it names, if any.

    Raises:
        ValueError: see :func:`open_state`.
    """
    # Blank values counted too: SQLAlchemy's URL parser drops "?schema=" silently.
    query = parse_qsl(url.partition("?")[2], keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return url, None
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(
            f"?schema= on a {parsed.get_backend_name()} state URL: only PostgreSQL has schemas"
        )
    if len(schemas) > 1:
        raise ValueError(f"the state URL names {len(schemas)} schemas: {schemas}")
    [schema] = schemas
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema {schema!r} on the state URL: a PostgreSQL schema name is ASCII letters, "
            "digits and underscores, not starting with a digit, at most 63 characters"
        )
    stripped = parsed.difference_update_query(["schema"])
    return stripped.render_as_string(hide_password=False), schema
