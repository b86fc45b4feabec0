"""The index's write transactions on PostgreSQL, straight on asyncpg.

Through SQLAlchemy a write transaction pays, around each of its round trips (BEGIN, every
statement, COMMIT), the adapter's bookkeeping: a greenlet hop, the compiled cache, the
pool's checkout and its reset on return. A sequential enqueue took 3.1 to 3.8 ms where a
bare commit of one row and a bare publish with its confirm took 1.1 ms together (bench:
decompose). :class:`PostgresWrites` runs the same transactions
(:mod:`amqp_queue.state.sql.transactions`, one algorithm per operation), their constructs
compiled for the driver by :class:`~amqp_queue.state.sql.compiled.DriverSql`, on the asyncpg
connection under a pooled one, as the SQLite writer does on its own connection.

A transaction begins with a plain ``BEGIN``: the server's default isolation, READ COMMITTED
unless the database or role sets another, as the store's own engine has it (an
``isolation_level`` option of a caller's engine does not reach it). What a transaction
raises rolls it back. A deadlock victim is run again by the caller
(``SqlExecution._committed``), as any write transaction.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from .commit_doubt import Commit
from .compiled import DriverSql
from .kept_connection import KeptCalls
from .postgres_reads import FAILURES
from .transactions import Count, Fetch, Step, Transaction, run_with

T = TypeVar("T")


class PostgresWrites:
    """Runs write transactions on a kept asyncpg connection (a pooled one while it is busy)."""

    def __init__(self, engine: AsyncEngine, schema: str | None) -> None:
        self._sql = DriverSql(engine.dialect, schema)
        self._kept = KeptCalls(engine, FAILURES)

    async def run(self, transaction: Transaction[T], commit: Commit[T] | None = None) -> T:
        """Runs ``transaction`` in one transaction; ``commit`` learns when its COMMIT is
        under way and what it returned (see :mod:`amqp_queue.state.sql.commit_doubt`)."""

        async def call(driver: Any) -> T:
            async with driver.transaction():
                result = await run_with(transaction, functools.partial(self._execute, driver))
                if commit is not None:
                    commit.sending_on(int(driver.get_server_pid()), result)
            return result

        return await self._kept.call(call)

    async def close(self) -> None:
        await self._kept.close()

    async def _execute(self, driver: Any, step: Step) -> object:
        if isinstance(step, Fetch):
            compiled, params = self._sql.prepare(step.statement, step.params)
            return compiled.rows(await driver.fetch(compiled.sql, *params))
        if isinstance(step, Count):
            compiled, params = self._sql.prepare(step.statement, step.params)
            # The command tag: "UPDATE <rows>", "DELETE <rows>", "INSERT 0 <rows>".
            return int(str(await driver.execute(compiled.sql, *params)).rsplit(" ", 1)[-1])
        compiled = self._sql.compiled(step.statement)
        await driver.executemany(compiled.sql, [compiled.params(row) for row in step.params])
        return None
