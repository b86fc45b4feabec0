"""Alembic's entry point, run by :mod:`amqp_queue.state.sql.schema_versions`.

Online only, on the connection given in ``config.attributes``: the caller holds the schema
lock and the transaction, so ``begin_transaction`` joins it instead of committing on its own.
Loaded by Alembic from its file, not imported: it imports nothing of the package.
"""

from __future__ import annotations

from alembic import context

attributes = context.config.attributes
context.configure(
    connection=attributes["connection"],
    target_metadata=attributes.get("metadata"),
    version_table=attributes["version_table"],
    # The tables' own schema comes from the connection's schema_translate_map.
    version_table_schema=attributes.get("schema"),
    # SQLite runs DDL in a transaction too (Alembic assumes it does not): all of it, and
    # the version, commits with the caller's transaction or not at all.
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
