"""A ``cancel_command`` cut short by its caller on a SQLite file's writer thread.

Found by the twenty-second session's probe: 11 of about 365 cut cancels on SQLite landed
after the call had raised (a ``get_status`` right after said ``pending``, a later one
``cancelled``); none of hundreds on PostgreSQL or Redis, whose engine path waits for the
transaction's end before it raises. On a SQLite file the transaction runs on the writer
thread, which the cut caller left to finish by itself. It now waits for that end too, so a
cut call's outcome is known once it raised. Here the writer thread takes 0.3 s over it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus
from amqp_queue.state.sql.sqlite_writer import SqliteWriter
from tests.rabbitmq_support import rabbitmq_store

pytestmark = pytest.mark.timeout(30)


async def test_a_cut_cancel_has_landed_or_not_once_it_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rabbitmq_store(tmp_path) as store:
        command = await store.enqueue("gw-1", b"reboot", 60)
        run = SqliteWriter._run
        slow = [True]

        def slowly(writer: SqliteWriter, transaction: Any, connection: sqlite3.Connection) -> Any:
            if slow:
                slow.clear()
                time.sleep(0.3)  # on the writer thread
            return run(writer, transaction, connection)

        monkeypatch.setattr(SqliteWriter, "_run", slowly)
        cancelling = asyncio.create_task(store.cancel_command(command))
        await asyncio.sleep(0.1)
        cancelling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelling
        assert await store.get_status(command) == CommandStatus.CANCELLED
