"""The verdict on a write whose answer was lost, once the index has been asked.

Both indexes that can lose a write's answer (PostgreSQL at its COMMIT:
:mod:`amqp_queue.state.sql.commit_doubt`; Redis at its script's reply:
:mod:`amqp_queue.state.redis_add_doubt`) ask, for at most :data:`BOUND` seconds, how many of
the write's commands are held, and decide the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from .cancellation import cancellation_kept
from .errors import StateError

T = TypeVar("T")

BOUND = 5.0
"""Seconds a store may spend finding out whether a write whose answer was lost was written."""


def unknown(failure: StateError, why: object) -> StateError:
    """The error for a write the index could not be asked about within :data:`BOUND`;
    ``why`` is the last failure (a bound that ran out says nothing: "timed out")."""
    error = StateError(
        f"{failure}; the write's outcome is unknown, its commands may have been written "
        f"(the index could not tell within {BOUND:g} s: {str(why) or 'timed out'})"
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


async def within_bound(
    call: Callable[[], Awaitable[T]], retry_on: tuple[type[BaseException], ...]
) -> T:
    """``call()``, run again with jitter while it fails with one of ``retry_on`` (the index
    still away), for at most :data:`BOUND` seconds.

    Raises:
        TimeoutError: the bound passed (the last failure is then not kept).
    """
    async with asyncio.timeout(BOUND):
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(retry_on),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            reraise=True,
        ):
            # A Redis call's dropped cancellation (its deadline's, too) raised again.
            with attempt, cancellation_kept():
                return await call()
    raise AssertionError("unreachable: the last failure is re-raised")
