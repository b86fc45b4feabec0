"""The SQL state index (SQLite by default, PostgreSQL with the same code)."""

from state.sql.engine import create_engine
from state.sql.schema import command_queue
from state.sql.store import SqlStore

__all__ = ["SqlStore", "command_queue", "create_engine"]
