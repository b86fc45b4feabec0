"""The Alembic script directory of the state index's schema: ``env.py`` and ``versions/``.

Applied by :mod:`amqp_queue.state.sql.schema_versions`; nothing here is imported as a module.
"""
