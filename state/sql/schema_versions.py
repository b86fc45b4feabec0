"""Schema versions of the state index: Alembic revisions in ``migrations/``, applied in place.

Revision ``0001`` is the first release's ``command_queue``; each later one brings it closer to
:mod:`amqp_queue.state.sql.schema`, whose metadata the newest one (the head) matches exactly
(tests/test_schema_versions.py compares them). Alembic runs programmatically on a connection
of the caller's: no ``alembic.ini``, and :func:`bring_to` runs in the caller's transaction,
under the caller's lock (see ``SqlStore.create_table``).

What :func:`bring_to` finds, and does:

- no ``command_queue``: creates it from the metadata and stamps the head, as Alembic's
  cookbook advises ("building an up to date database from scratch"), rather than replaying
  every revision.
- a ``command_queue`` without a version (:data:`VERSION_TABLE`): a release before schema
  versions made it.
  It is stamped with the newest revision it already matches (``0003`` if it has the owner
  table, else ``0001``, whose successor tolerates every index layout those releases left) and
  upgraded.
- an older revision: upgraded; the same revision: nothing. Automatically, rather than
  refused until someone runs ``amqp-queue migrate``: the lock already makes it safe with
  replicas starting together, and a deploy needs no step of its own (``migrate`` remains for
  doing it ahead of time, seeing the revision, or going back before a rollback).
- a revision this code does not know (a newer release upgraded the database): refused with a
  :class:`StateError`, since this code may misread what it would find there.

A new revision: a file in ``migrations/versions/`` named ``rNNNN_<what>.py``, written like
the others (frozen: it imports nothing from the package), the same change in ``schema.py``,
and :data:`HEAD_REVISION` set to it; tests/test_schema_versions.py fails until all three
agree.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa

from ..errors import StateError
from .schema import command_queue, metadata, outbox_owner

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger("amqp_queue.state.sql")

SCRIPT_LOCATION = Path(__file__).with_name("migrations")
HEAD = "head"
FIRST_RELEASE = "0001"
HEAD_REVISION = "0008"
"""The newest revision, known without loading Alembic: a database already there, the common
case, costs one query and no import (Alembic adds some 50 ms to every process's start).
tests/test_schema_versions.py checks it is the scripts' head."""
VERSION_TABLE = "command_queue_version"
"""Where the revision is kept: not Alembic's default ``alembic_version``, which the
application sharing the database may well use for its own history."""
# Releases before schema versions, by the newest of their tables: its revision.
_UNVERSIONED = ((outbox_owner.name, "0003"), (command_queue.name, FIRST_RELEASE))


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """The revision of a database's schema before and after :func:`bring_to`.

    ``before`` is None for a database without the index's tables; for one a release before
    schema versions made, the revision it was found to match.
    """

    before: str | None
    after: str


def _config(connection: sa.Connection | None = None, schema: str | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes.update(
        connection=connection, schema=schema, metadata=metadata, version_table=VERSION_TABLE
    )
    return config


@functools.cache
def revisions() -> tuple[str, ...]:
    """Every revision this code knows, oldest first; the last one is the head."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config())
    return tuple(reversed([each.revision for each in script.walk_revisions()]))


def current(connection: sa.Connection, schema: str | None) -> str | None:
    """The revision the database says it is at (in :data:`VERSION_TABLE`), if any.

    Read here rather than by Alembic's MigrationContext, which logs its set-up at INFO on
    every call: a store opening a database at the head has nothing to say.
    """
    if not sa.inspect(connection).has_table(VERSION_TABLE, schema=schema):
        return None
    version = sa.table(VERSION_TABLE, sa.column("version_num", sa.String()), schema=schema)
    found: str | None = connection.execute(sa.select(version.c.version_num)).scalar_one_or_none()
    return found


def bring_to(connection: sa.Connection, schema: str | None, target: str = HEAD) -> SchemaChange:
    """Brings the schema in ``schema`` to revision ``target`` (the head by default).

    Runs in the connection's transaction; the caller holds the lock that keeps other
    processes from doing the same at once.

    Args:
        connection: a connection in a transaction, with the ``schema_translate_map`` that
            puts the tables in ``schema``.
        schema: the database schema of the tables and the version; None for the default.
        target: ``head`` or a known revision; an older one than the database's downgrades it.

    Returns:
        The revision before and after.

    Raises:
        ValueError: ``target`` is not a revision this code knows.
        StateError: the database is at a revision this code does not know.
    """
    before = current(connection, schema)
    if before == HEAD_REVISION and target in (HEAD, HEAD_REVISION):
        return SchemaChange(before, before)
    known = revisions()
    after = known[-1] if target == HEAD else target
    if after not in known:
        raise ValueError(f"no schema revision {target!r}; this release knows {', '.join(known)}")
    if before is None:
        before = _unversioned(connection, schema)
    if before is None:
        _create(connection, schema, after)
        return SchemaChange(None, after)
    if before not in known:
        raise StateError(
            f"the state index's schema is at revision {before!r}, newer than this release of "
            f"amqp-queue knows (up to {known[-1]!r}): run a newer release, or bring the "
            f"schema back with that release's `amqp-queue migrate --revision {known[-1]}`"
        )
    if known.index(after) > known.index(before):
        logger.info("upgrading the state index's schema from %s to %s", before, after)
        _alembic("upgrade", connection, schema, after)
    elif known.index(after) < known.index(before):
        logger.warning("downgrading the state index's schema from %s to %s", before, after)
        _alembic("downgrade", connection, schema, after)
    return SchemaChange(before, after)


def _unversioned(connection: sa.Connection, schema: str | None) -> str | None:
    """Stamps a table that a release before schema versions made with the revision it
    matches, and returns it; None when there is no table."""
    inspector = sa.inspect(connection)
    for table, revision in _UNVERSIONED:
        if inspector.has_table(table, schema=schema):
            logger.info(
                "the state index's schema has no version: a release before schema versions "
                "made it; taking it as revision %s",
                revision,
            )
            _alembic("stamp", connection, schema, revision)
            return revision
    return None


def _create(connection: sa.Connection, schema: str | None, revision: str) -> None:
    if revision != revisions()[-1]:
        # The metadata is the head's schema; an older one is only reached by its revisions.
        _alembic("upgrade", connection, schema, revision)
        return
    metadata.create_all(connection)
    _alembic("stamp", connection, schema, revision)


def _alembic(
    action: Literal["upgrade", "downgrade", "stamp"],
    connection: sa.Connection,
    schema: str | None,
    revision: str,
) -> None:
    """Runs Alembic's command ``action`` to ``revision`` in the connection's transaction."""
    from alembic import command  # here, not at the top: see HEAD_REVISION

    run = {"upgrade": command.upgrade, "downgrade": command.downgrade, "stamp": command.stamp}
    run[action](_config(connection, schema), revision)


def ddl_lock_key(schema: str | None) -> int:
    """The advisory lock key for creating or upgrading ``command_queue`` in ``schema``: the
    same in every process (a digest, not Python's per-process salted ``hash``), as the signed
    64-bit integer ``pg_advisory_xact_lock`` takes. Unchanged since releases before schema
    versions, so in a rolling deploy their replicas take turns with this one's."""
    name = f"amqp_queue.create_table:{schema or ''}.{command_queue.name}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
