"""The index's statements compiled for a driver, to run on its connections directly.

The same constructs (:mod:`amqp_queue.state.sql.statements`) compiled by SQLAlchemy for the
engine's dialect, every value going through the column type's own bind and result
processors, so rows are stored and read exactly as on the SQLAlchemy path. Used where
SQLAlchemy's per-call overhead outweighs the database's own work: the SQLite writer and reads
(:mod:`amqp_queue.state.sql.sqlite_direct`), PostgreSQL's hot reads
(:mod:`amqp_queue.state.sql.postgres_reads`) and its write transactions
(:mod:`amqp_queue.state.sql.postgres_writes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from .statements import Statement

# IN lists are padded to a power of two with a repeated value (harmless in IN), so a few
# compiled statements serve every size; beyond this, each size is its own (SQLite allows
# 32,766 parameters; a list this long is rare).
_MOST_PADDED = 16_384


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


class DriverSql:
    """Constructs compiled for one dialect, each once (per padded ``IN`` size).

    ``schema``: the schema holding the table, written into the SQL (what the engine's
    ``schema_translate_map`` does on the SQLAlchemy path).
    """

    def __init__(self, dialect: Dialect, schema: str | None = None) -> None:
        self._dialect = dialect
        self._schema = schema
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
        compiled = statement.compile(
            dialect=dialect,
            schema_translate_map={None: self._schema} if self._schema else None,
            render_schema_translate=self._schema is not None,
        )
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
            (
                str(name),
                column.type.dialect_impl(dialect).result_processor(
                    dialect, _type_code(dialect, column.type)
                ),
            )
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


def _type_code(dialect: Dialect, column_type: sa.types.TypeEngine[Any]) -> int | None:
    """The type code a driver's cursor would report for a column of ``column_type``.

    Result processors are built without a cursor here, and PostgreSQL's numeric ones choose by
    the server's type: the index's ``Float`` columns are ``double precision`` (OID 701), its
    ``Numeric`` ones ``numeric`` (1700). Other types, and SQLite, take no code.
    """
    if dialect.name != "postgresql":
        return None
    if isinstance(column_type, sa.Float):
        return 701
    if isinstance(column_type, sa.Numeric):
        return 1700
    return None
