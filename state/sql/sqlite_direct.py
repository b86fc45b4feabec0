"""The index's statements straight on the sqlite3 driver, beside a SQLite engine.

aiosqlite runs every call in a thread of its own; through SQLAlchemy one write transaction
(``BEGIN IMMEDIATE``, an insert, ``COMMIT``) costs eight hops to that thread and back (a cursor
opened and closed per statement, the pool's reset on return), a one-statement read about
six, and at a hundred or more microseconds each they weigh more than the commit's fsync.
So on a SQLite file the store also runs its statements on driver connections of its own
(:mod:`amqp_queue.state.sql.sqlite_writer`, :mod:`amqp_queue.state.sql.sqlite_reads`).

They are the same constructs (:mod:`amqp_queue.state.sql.statements`), compiled here by
SQLAlchemy for the engine's dialect, and every value goes through the column type's own bind
and result processors, so rows are stored and read exactly as on the SQLAlchemy path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from .statements import Statement

FAILURES = (sqlite3.Error, OSError)
"""What the driver raises when the database fails."""

# IN lists are padded to a power of two with a repeated value (harmless in IN), so a few
# compiled statements serve every size; beyond this, each size is its own (SQLite allows
# 32,766 parameters; a list this long is rare).
_MOST_PADDED = 16_384


def usable(engine: AsyncEngine) -> bool:
    """Whether ``engine`` is a SQLite file with a pool of separate connections.

    An in-memory database lives in one shared connection; it keeps the SQLAlchemy path.
    """
    url = engine.url
    database = url.database or ""
    return (
        url.get_backend_name() == "sqlite"
        and url.get_driver_name() == "aiosqlite"
        and database != ""
        and ":memory:" not in database
        and "mode=memory" not in database
        and url.query.get("mode") != "memory"
        and not isinstance(engine.sync_engine.pool, StaticPool | SingletonThreadPool)
    )


@dataclass(frozen=True, slots=True)
class SqliteFile:
    """The file as the engine's own connections open it: a plain path made absolute when
    the engine was created; a relative path in URI mode, like theirs, resolved against the
    working directory of each open. Taken when the store is made, as the engine's was."""

    path: str
    uri: bool

    @classmethod
    def of(cls, engine: AsyncEngine) -> SqliteFile:
        args, options = engine.dialect.create_connect_args(engine.url)
        return cls(args[0], bool(options.get("uri", False)))

    def connect(
        self, pragmas: Iterable[str], *, check_same_thread: bool = True
    ) -> sqlite3.Connection:
        """A connection in autocommit mode: every BEGIN is the caller's."""
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=check_same_thread, uri=self.uri
        )
        try:
            for pragma in pragmas:
                connection.execute(pragma)
        except BaseException:
            connection.close()
            raise
        return connection


_Step = tuple[str | None, int | None, Any, Any]
"""Where a positional parameter comes from: its bind parameter's name (None: a value built
into the construct), its index in an expanding list, its bind processor, the built-in value."""


class Compiled:
    """One statement compiled for the driver: its SQL, its parameters in position order
    through their bind processors, and its rows through their result processors."""

    __slots__ = ("_columns", "_plain", "_steps", "expanding", "sql")

    def __init__(
        self, sql: str, steps: list[_Step], columns: list[tuple[str, Any]], expanding: list[str]
    ) -> None:
        self.sql = sql
        self.expanding = expanding
        """The names of its expanding (``IN``) parameters."""
        self._steps = steps
        # Every parameter straight from one value: the common case, made fast.
        plain = [(name, process) for name, index, process, _ in steps if index is None and name]
        self._plain = plain if len(plain) == len(steps) else None
        self._columns = columns

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional parameters for ``values`` (bind parameter name to value)."""
        if self._plain is not None:
            # Once per row of every batch insert: a plain comprehension.
            return tuple(
                [
                    values[name] if process is None else process(values[name])
                    for name, process in self._plain
                ]
            )
        out: list[Any] = []
        for name, index, process, constant in self._steps:
            if name is None:
                out.append(constant)
                continue
            value = values[name] if index is None else values[name][index]
            out.append(value if process is None else process(value))
        return tuple(out)

    def rows(self, fetched: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
        """The rows the driver returned, as column name to value."""
        return [
            {
                name: value if process is None else process(value)
                for (name, process), value in zip(self._columns, row, strict=True)
            }
            for row in fetched
        ]


class SqliteSql:
    """Constructs compiled for one SQLite dialect, each once (per padded ``IN`` size)."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[tuple[int, tuple[int, ...]], tuple[Statement, Compiled]] = {}

    def prepare(
        self, statement: Statement, values: Mapping[str, Any]
    ) -> tuple[Compiled, tuple[Any, ...]]:
        """The compiled statement and its positional parameters for ``values``."""
        compiled = self.compiled(statement)
        if compiled.expanding:
            values = {**values, **{name: _padded(values[name]) for name in compiled.expanding}}
            compiled = self.compiled(
                statement, tuple(len(values[name]) for name in compiled.expanding)
            )
        return compiled, compiled.params(values)

    def compiled(self, statement: Statement, sizes: tuple[int, ...] = ()) -> Compiled:
        """``statement`` compiled, with its expanding parameters (in
        :attr:`Compiled.expanding` order) of these sizes."""
        key = (id(statement), sizes)
        cached = self._compiled.get(key)
        if cached is None:
            # The construct is kept with it, so its id is never reused while cached.
            cached = self._compiled[key] = (statement, self._compile(statement, sizes))
        return cached[1]

    def _compile(self, statement: Statement, sizes: tuple[int, ...]) -> Compiled:
        dialect = self._dialect
        compiled = statement.compile(dialect=dialect)
        binds = compiled.binds
        expanding = sorted({bind.key for bind in binds.values() if bind.expanding})
        sql, names = compiled.string, list(compiled.positiontup or [])
        origin: dict[str, tuple[str, int]] = {}
        if sizes:
            dummy: dict[str, Any] = {name: None for name, bind in binds.items() if bind.required}
            dummy.update({name: [None] * size for name, size in zip(expanding, sizes, strict=True)})
            expanded = compiled.construct_expanded_state(dummy)
            sql, names = expanded.statement, list(expanded.positiontup or [])
            for name, each in expanded.parameter_expansion.items():
                origin.update({new: (name, index) for index, new in enumerate(each)})
        steps: list[_Step] = []
        for name in names:
            base, index = origin.get(name, (name, None))
            bind = binds[base]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                steps.append((base, index, process, None))
            else:  # a value built into the construct (a reason, a role)
                value = bind.effective_value
                steps.append((None, None, None, value if process is None else process(value)))
        columns = [
            (str(name), column.type.dialect_impl(dialect).result_processor(dialect, None))
            for name, column in statement.exported_columns.items()
        ]
        return Compiled(sql, steps, columns, expanding)


def _padded(values: list[Any]) -> list[Any]:
    if not values:
        return values
    size = 1 << (len(values) - 1).bit_length()
    if size > _MOST_PADDED:
        return values
    return values + values[:1] * (size - len(values))
