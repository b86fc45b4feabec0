"""What the index does about its callers' cancellations.

- :func:`cancellation_kept`: a cancellation redis-py dropped, raised again where the Redis
  call returns. redis-py sends each command (a pipeline, a script) under
  ``asyncio.wait_for(send, socket_timeout)``. On Python 3.11 ``wait_for`` returns the inner
  result when a cancellation arrives as that (all but instant) send finishes, and the
  cancellation is gone: a ``consume()`` loop cancelled while it asked the index went on
  handing out commands, its task never ending, and an ``asyncio.timeout()`` around a call
  could lose its deadline (``tests/test_redis_cancellation.py``). The task still counts the
  request (``Task.cancelling()``), so a call that returns with more requests pending than
  it began with had one dropped: it is raised there, as if it had come while the reply was
  read, which a caller meets anyway and handles. Python 3.12's ``wait_for`` drops none.
- :func:`run_through`: a write run to its end through its caller's cancellation. Cut at its
  COMMIT, a transaction may have landed all the same (PostgreSQL), and one abandoned half way
  on a SQLite connection of the pool keeps the write lock until the garbage collector finds
  the connection (``tests/test_cancelled_bare_drains.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

logger = logging.getLogger("amqp_queue.state")


@contextmanager
def cancellation_kept() -> Iterator[None]:
    """Raises ``CancelledError`` when the block (Redis calls) ends, normally or by an
    error, with a cancellation of the running task requested and dropped inside it."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        yield
    except asyncio.CancelledError:
        raise
    except BaseException as failure:
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError from failure
        raise
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


async def run_through(
    work: Awaitable[T],
    undo: Callable[[T], Awaitable[object]] | None = None,
    *,
    within: float | None = None,
) -> T:
    """Runs ``work`` to its end and returns its answer.

    The caller's cancellation (each one: a deadline and a task group may both cancel) waits
    for that end, then for ``undo`` of the answer if ``work`` did answer (what a cancelled
    call took goes back), and is raised after them. Nothing is left running behind the
    caller: a later call of its own never overtakes the cut one, nor its undoing, and a
    store closing after it finds nothing under way (past ``within``, the work is cancelled
    and may still be ending: a COMMIT in flight then may land after the caller raised). The
    index's own timeouts bound the wait (SQLite's busy timeout, asyncpg's
    ``command_timeout``), and ``within`` where given (as :func:`finished`'s). A failure of
    ``undo`` is chained to the ``CancelledError``; ``undo`` logs what it could not do.
    """
    answer, cut = await finished(work, within)
    if cut:
        await undone(undo, answer)
    return answer


async def finished(work: Awaitable[T], within: float | None = None) -> tuple[T, bool]:
    """Runs ``work`` to its end through the caller's cancellations; its answer, and whether
    the caller was cancelled meanwhile (then :func:`undone` follows, unless the call counts
    as completed: a drain's hand-over that landed). Raises what ``work`` raised, or
    ``CancelledError`` (chained to ``work``'s failure) where the caller was cancelled and
    ``work`` did not answer.

    ``within``: seconds a cancelled caller waits for that end at most; past them ``work`` is
    cancelled (an index stalled, or waiting on a lock) and the cancellation raised at once.
    """
    running = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(running), False
    except asyncio.CancelledError:
        if running.cancelled():  # the call itself (the loop shutting down), not its caller
            raise
    await outlasting(running, within)
    if not running.done():
        running.cancel()
        running.add_done_callback(_retrieved)
        raise asyncio.CancelledError
    if running.cancelled():
        raise asyncio.CancelledError
    if (failure := running.exception()) is not None:
        raise asyncio.CancelledError from failure  # the failure stays visible
    return running.result(), True


async def undone(undo: Callable[[T], Awaitable[object]] | None, answer: T) -> NoReturn:
    """Runs ``undo`` of a cancelled caller's ``answer`` to its end (none: nothing to undo),
    then raises the caller's cancellation, chained to ``undo``'s failure. Separate from
    :func:`finished` so that a call holding a turn (SQLite's one writer) gives it up
    before its undoing, which waits for a turn of its own."""
    failure = None
    if undo is not None:
        undoing = asyncio.ensure_future(undo(answer))
        await outlasting(undoing)
        failure = None if undoing.cancelled() else undoing.exception()
    raise asyncio.CancelledError from failure


async def outlasting(running: asyncio.Future[Any], within: float | None = None) -> None:
    """Waits until ``running`` is done, through the caller's cancellations (a caller handling
    its first one raises it once this returns: a deadline and a task group may both cancel,
    and the second must not cut the wait short); ``within`` seconds at most, if given."""
    loop = asyncio.get_running_loop()
    until = None if within is None else loop.time() + within
    while not running.done():
        left = None if until is None else until - loop.time()
        if left is not None and left <= 0:
            return
        try:
            await asyncio.wait([running], timeout=left)
        except asyncio.CancelledError:
            continue


def _retrieved(running: asyncio.Future[Any]) -> None:
    """Reads the end of work its caller gave up on, so that none is reported unretrieved."""
    if not running.cancelled() and (failure := running.exception()) is not None:
        logger.debug("work its cancelled caller gave up on failed: %r", failure)


def being_cancelled() -> bool:
    """Whether the running task is being cancelled (not by a closed channel's failed RPC)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def refuse_if_cancelled() -> None:
    """Raises the cancellation of the running task, if one is requested: a drain cancelled
    once it had handed over returned what it handed over and left the cancellation
    requested, so a task draining in a loop ends at its next drain."""
    if being_cancelled():
        raise asyncio.CancelledError


LEFT_WAIT = 0.25
"""Seconds a closing store waits for each set of reads left to finish (a healthy index ends
them in milliseconds)."""


class LeftToFinish:
    """Reads whose callers were cancelled, running on by themselves (:meth:`run`), until
    their store's close waits for them (:meth:`wait`): none outlives the store holding a
    connection of its engine."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    async def run(self, read: Awaitable[T]) -> T:
        """Runs ``read``; a caller cancelled meanwhile leaves it to finish by itself (its
        failure logged at debug level). Interrupted half way, a read spoils its connection
        to PostgreSQL: thrown away, the next read opens a new one, and asyncpg's lost future
        is reported as an error nobody retrieved."""
        running = asyncio.ensure_future(read)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            self._running.add(running)
            running.add_done_callback(self._ended)
            raise

    def _ended(self, running: asyncio.Future[Any]) -> None:
        self._running.discard(running)
        if not running.cancelled() and (failure := running.exception()) is not None:
            logger.debug("a read went on after its caller was cancelled and failed: %r", failure)

    async def wait(self, seconds: float = LEFT_WAIT) -> None:
        """Waits for the reads still running, ``seconds`` at most, then cancels the rest (on
        a stalled index they would hold a close for as long as the index's own timeouts)."""
        if not self._running:
            return
        _, late = await asyncio.wait(set(self._running), timeout=seconds)
        for running in late:
            running.cancel()
        if late:
            await asyncio.wait(late, timeout=seconds)
