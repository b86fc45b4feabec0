"""What a failed index call says: the driver's words, and in words a user reads when the
driver's own say only that its connection's protocol broke."""

from __future__ import annotations

import asyncpg
import sqlalchemy.exc

from amqp_queue.state.sql.engine import driver_reason


def test_a_connection_broken_mid_call_says_so() -> None:
    # What asyncpg raised on a pooled connection the server had ended during a restart
    # (a fan-out probe restarting a private PostgreSQL every few seconds).
    broken = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    reason = driver_reason(broken)
    assert reason.startswith("the connection to the database broke during the call")
    assert "cannot switch to state 15" in reason


def test_a_statement_error_is_the_drivers_message_alone() -> None:
    refused = sqlalchemy.exc.IntegrityError("INSERT ...", {}, Exception("duplicate key"))
    assert driver_reason(refused) == "duplicate key"
