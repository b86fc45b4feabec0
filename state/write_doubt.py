"""The verdict on a write whose answer was lost, once the index has been asked.

Both indexes that can lose a write's answer (PostgreSQL at its COMMIT:
:mod:`amqp_queue.state.sql.commit_doubt`; Redis at its script's reply:
:mod:`amqp_queue.state.redis_add_doubt`) ask, for at most :data:`BOUND` seconds, how many of
the write's commands are held, and decide the same way.
"""

from __future__ import annotations

import logging

from .errors import StateError

BOUND = 5.0
"""Seconds a store may spend finding out whether a write whose answer was lost was written."""


def unknown(failure: StateError, why: object) -> StateError:
    """The error for a write the index could not be asked about within :data:`BOUND`."""
    error = StateError(
        f"{failure}; the write's outcome is unknown, its commands may have been written "
        f"(the index could not tell within {BOUND:g} s: {why})"
    )
    error.__cause__ = failure
    return error


def settle(failure: StateError, held: int, written: int, logger: logging.Logger) -> None:
    """Returns when all ``written`` commands are held (the write landed); raises ``failure``
    when none is (it did not); else a StateError saying the outcome is unknown (one
    transaction or script is all or nothing: never seen, said rather than hidden)."""
    if held == written:
        logger.warning("write landed though its answer was lost: %s", failure)
        return
    if held == 0:
        raise failure
    raise StateError(
        f"{failure}; the write's outcome is unknown: {held} of its {written} commands are in "
        "the index"
    ) from failure
