"""Which failed transactions PostgreSQL asks the client to run again, and how often we do.

Two of this index's writers can each hold a row the other needs: a batch that supersedes a
command and marks others published, the outbox relay marking a set published, a delivery
mark waiting in the row's lock queue. PostgreSQL then aborts one of them with
``deadlock_detected`` (SQLSTATE 40P01); under SERIALIZABLE it may abort one with
``serialization_failure`` (40001). Both roll the whole transaction back and mean "try again"
(PostgreSQL manual, 13.4 and Appendix A). A write transaction here is one unit with no effect
outside the database, so running it again is safe; every other failure is raised at once.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

logger = logging.getLogger("amqp_queue.state.sql")

RETRY_SQLSTATES = frozenset({"40P01", "40001"})
"""deadlock_detected, serialization_failure."""

ATTEMPTS = 5
"""How many times at most one write transaction runs; the last failure is raised."""


UNIQUE_VIOLATION = frozenset({"23505"})
"""unique_violation: retried only by a transaction whose next run sees what it collided with
(a release, see ``SqlStore._release``)."""


def is_transient(exc: BaseException, also: frozenset[str] = frozenset()) -> bool:
    """Whether ``exc``, or the database error it wraps, is one PostgreSQL asks to retry (or
    has one of the SQLSTATEs ``also``)."""
    codes = RETRY_SQLSTATES | also
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, DBAPIError):
            # asyncpg's adapted errors (SQLAlchemy 2) and psycopg's carry the code as
            # ``sqlstate``, psycopg2's as ``pgcode``.
            orig = cause.orig
            code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            return code in codes
        # A driver's own error, where the store runs a statement on it directly (asyncpg's).
        code = getattr(cause, "sqlstate", None)
        if isinstance(code, str):
            return code in codes
        cause = cause.__cause__
    return False


def retrying(also: frozenset[str] = frozenset()) -> AsyncRetrying:
    """A retry loop for one write transaction: transient failures only (and ``also``),
    jittered and short (the other transaction has already gone on when PostgreSQL picks a
    victim)."""
    return AsyncRetrying(
        # Exceptions only: a caller's cut raised once its transaction ended is chained to
        # the transaction's failure, a deadlock maybe, and must not be run again and lost.
        retry=retry_if_exception(
            lambda exc: isinstance(exc, Exception) and is_transient(exc, also)
        ),
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_random_exponential(multiplier=0.01, max=0.5),
        before_sleep=_log_retry,
        reraise=True,
    )


def _log_retry(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.warning(
        "state index write transaction aborted (attempt %d of %d), running it again in %.3f s: %s",
        state.attempt_number,
        ATTEMPTS,
        wait,
        failure,
    )
