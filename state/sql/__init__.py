"""The SQL state index (SQLite by default, PostgreSQL with the same code)."""

from .engine import create_engine
from .schema import command_queue
from .store import SqlStore

__all__ = ["SqlStore", "command_queue", "create_engine"]
