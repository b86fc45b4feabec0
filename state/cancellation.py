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
  the connection (``tests/test_cancelled_bare_drains.py``). The caller waits for it a second
  at most; an index that stalls longer ends it by its own timeouts, in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

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


CANCEL_WAIT = 1.0
"""Seconds a cancelled caller of :func:`run_through` waits for its call's end, before it
leaves the call to end in the background (the index stalls: its own timeouts end it)."""

# The calls left to end in the background, and their undoing: kept from the garbage collector.
_left: set[asyncio.Future[Any]] = set()


async def run_through(
    work: Awaitable[T],
    undo: Callable[[T], Awaitable[object]] | None = None,
    *,
    within: float = CANCEL_WAIT,
) -> T:
    """Runs ``work`` to its end and returns its answer.

    The caller's cancellation (each one: a deadline and a task group may both cancel) waits
    up to ``within`` seconds for that end, then for ``undo`` of the answer if ``work`` did
    answer (what a cancelled call took goes back), and is raised after them. A call still
    running then is left to end in the background, and undone when it answers. A failure of
    ``undo`` is chained to the ``CancelledError``; ``undo`` logs what it could not do.
    """
    running = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if running.cancelled():  # the call itself (the loop shutting down), not its caller
            raise
    await _waited(running, within)
    if not running.done():
        _leave(running, undo)
        raise asyncio.CancelledError
    if running.cancelled() or running.exception() is not None or undo is None:
        raise asyncio.CancelledError
    undoing = asyncio.ensure_future(undo(running.result()))
    await _waited(undoing, None)
    failure = None if undoing.cancelled() else undoing.exception()
    raise asyncio.CancelledError from failure


async def _waited(running: asyncio.Future[Any], within: float | None) -> None:
    """Waits until ``running`` is done, or ``within`` seconds, through the caller's
    cancellations."""
    loop = asyncio.get_running_loop()
    deadline = None if within is None else loop.time() + within
    while not running.done():
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            return
        try:
            await asyncio.wait([running], timeout=left)
        except asyncio.CancelledError:
            continue


def _leave(running: asyncio.Future[T], undo: Callable[[T], Awaitable[object]] | None) -> None:
    """Lets ``running`` end in the background; ``undo`` of its answer once it answers."""
    _left.add(running)

    def ended(done: asyncio.Future[T]) -> None:
        _left.discard(done)
        if done.cancelled():
            return
        if (failure := done.exception()) is not None:
            # Its caller heard CancelledError long ago; that the call failed is still news.
            logger.info("a call left to end after its caller was cancelled failed: %r", failure)
            return
        if undo is None:
            return
        undoing = asyncio.ensure_future(undo(done.result()))
        _left.add(undoing)
        undoing.add_done_callback(_undone)

    running.add_done_callback(ended)


def _undone(undoing: asyncio.Future[Any]) -> None:
    _left.discard(undoing)
    if not undoing.cancelled():
        undoing.exception()  # retrieved: undo logs its own failure
