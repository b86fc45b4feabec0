"""Whether an add whose reply was lost was written, found out before answering.

Redis appends a script's writes to its AOF before it answers, and a shutdown handled in the
same turn of its event loop (SIGTERM), or a crash between the two, answers nobody: the
commands come back with the AOF while the client only sees its connection close. The store
used to raise StateError, telling the caller nothing was written, for commands the outbox
relay then published and devices received (tests/test_redis_add_doubt.py); a caller that
enqueued again on the error sent the device the command twice. The promise is that an error
means nothing was written, wherever we can tell (as on PostgreSQL: ``sql/commit_doubt.py``).

So an add runs on a connection of its own, taken before it is sent: failing to get one, it
was not sent, and the error stands at once (an outage keeps failing fast). When it fails
after it was sent with a lost connection or a timeout (any other error is Redis refusing the
script, which then wrote nothing), the store asks again, retrying with jitter for at most
:data:`~amqp_queue.state.write_doubt.BOUND` seconds, whether the add's commands are held
(:data:`~amqp_queue.state.redis_add_scripts.ADD_LOOKUP`): all of them, it was written and the
call returns; none, it was not, and the original StateError stands; the lookup then leaves a
fence, so the add, were it still on its way on a connection given up on, writes nothing. If
it cannot tell within the bound, a StateError that says the outcome is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import write_doubt
from .cancellation import cancellation_kept
from .errors import StateError
from .redis_encoding import milliseconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("amqp_queue.state.redis")


FENCE_TTL = timedelta(minutes=10)
"""How long a looked-up add found unwritten stays fenced off (a late copy writes nothing)."""


Args = Sequence[str | bytes] | Callable[[], Sequence[str | bytes]]
"""A script's arguments, or what makes them once its connection is taken: a call that decides
expiry reads its time then, not before a wait for the event loop or the pool."""


async def add_once(
    client: Redis,
    add: AsyncScript,
    lookup: AsyncScript,
    keys: Sequence[str],
    args: Args,
    lookup_args: Sequence[str | bytes],
    command_ids: Sequence[str],
) -> Any:
    """Runs the ADD script once with ``keys`` and ``args`` and returns its reply; after a
    lost reply, what :func:`_settle` finds (0 superseded: that count went with the reply).

    ``lookup_args`` are the leading arguments every script takes (prefix, now, finished TTL).

    Raises:
        StateError: Redis failed and nothing was written; or, saying its outcome is
            unknown, the add may have been written.
    """
    try:
        return await send_once(client, add, keys, args, "add")
    except ReplyLost as lost:
        fence = [*lookup_args, str(milliseconds(FENCE_TTL))]
        await _settle(lookup, keys, fence, command_ids, lost.failure)
        return 0


class ReplyLost(Exception):
    """A script failed after it may have run (its reply was lost); ``failure`` is what to
    raise should it not have."""

    def __init__(self, failure: StateError) -> None:
        super().__init__(str(failure))
        self.failure = failure


def made(args: Args) -> Sequence[str | bytes]:
    return args() if callable(args) else args


async def send_once(
    client: Redis,
    script: AsyncScript,
    keys: Sequence[str],
    args: Args,
    action: str,
) -> Any:
    """Runs ``script`` once, on a connection of its own taken before it is sent (and its
    arguments made), and returns its reply.

    Raises:
        StateError: it did not run (no connection; Redis refused it).
        ReplyLost: it may have run: the connection was lost or timed out after it was sent.
    """
    from redis.exceptions import BusyLoadingError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    sender = client.client()
    try:
        try:
            with cancellation_kept():
                await open_sender(sender)
        except (RedisError, OSError) as exc:
            raise StateError(f"redis {action} failed: {exc}") from exc
        resent = resends(sender)
        try:
            with cancellation_kept():
                return await _made_anew_each_send(
                    sender, lambda: script(keys=keys, args=made(args), client=sender)
                )
        except (RedisError, OSError) as exc:
            lost = isinstance(
                exc, RedisConnectionError | RedisTimeoutError | OSError
            ) and not isinstance(exc, BusyLoadingError)
            failure = StateError(f"redis {action} failed: {exc}")
            # A refusal (LOADING while Redis replays its AOF, READONLY, OOM, a script error)
            # ran nothing, unless a client that resends had sent the script before and lost
            # that reply: then only the index can say.
            if not (lost or resent):
                raise failure from exc
            failure.__cause__ = exc
            raise ReplyLost(failure) from exc
    finally:
        await sender.aclose(close_connection_pool=False)


async def _made_anew_each_send(sender: Redis, send: Callable[[], Awaitable[Any]]) -> Any:
    """``send()``, sent again as the client's policy says after a lost link, its arguments
    made anew each time: the client sending it again itself would send the first send's
    arguments, and its time, after a back-off that may outlast a command's TTL."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    connection = sender.connection
    if connection is None or not resends(sender):
        return await send()
    policy = connection.retry
    connection.retry = Retry(NoBackoff(), 0)
    try:
        # A failed send has disconnected the connection already; the next one connects.
        return await policy.call_with_retry(send, _sent_in_vain)
    finally:
        connection.retry = policy


async def _sent_in_vain(error: Exception) -> None:
    logger.debug("redis: a script's link was lost (%s); sending it again", error)


def resends(sender: Redis) -> bool:
    """Whether the client sends a command again after a lost reply (a client built with
    ``Redis(host=...)`` retries, one from a URL does not, unless told to)."""
    retry = getattr(sender.connection, "retry", None)
    return retry is not None and retry.get_retries() > 0


async def open_sender(sender: Redis) -> None:
    """Gives ``sender`` a connection that is open as far as the client can tell."""
    await sender.initialize()
    connection = sender.connection
    # A pooled connection the server closed while it sat idle (Redis went down) is at EOF.
    # With maintenance notifications on, redis-py's pool skips that check and hands it out:
    # an add sent on it would be in doubt, and wait for Redis to come back, for nothing.
    if connection is not None and await connection.can_read():
        await connection.disconnect()
        await connection.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


async def _settle(
    lookup: AsyncScript,
    keys: Sequence[str],
    args: Sequence[str | bytes],
    command_ids: Sequence[str],
    failure: StateError,
) -> None:
    """Returns if the add of ``command_ids`` whose reply was lost was written after all.

    Raises:
        StateError: ``failure`` if it was not (it is fenced off from now); one saying the
            outcome is unknown if that cannot be told within the bound.
    """
    from redis.exceptions import RedisError

    try:
        # The add's keys: the lookup reads only the leading ones all scripts take.
        held = int(
            await write_doubt.within_bound(
                lambda: lookup(keys=keys, args=[*args, *command_ids]), (RedisError, OSError)
            )
        )
    except (TimeoutError, RedisError, OSError) as exc:
        raise write_doubt.unknown(failure, exc) from failure
    write_doubt.settle(failure, held, len(command_ids), logger)
