"""A set-wide change on Redis whose reply was lost, run again: a rollout's confirm or cancel, a
device's retirement.

One Lua script changes every open member at once. Its reply can be lost after it ran, as a
single change's can (:mod:`amqp_queue.state.redis_changes`): raising StateError then told the
caller "not written" of commands Redis had confirmed, which devices then received. So the
script runs on a connection of its own, taken before it is sent (failing to get one, it was
not sent: the error stands at once, an outage keeps failing fast); failing after it was sent
with a lost connection or a timeout, it is run again, retried with jitter while Redis is away,
for at most :data:`~amqp_queue.state.write_doubt.BOUND` seconds. Each call carries a token
(:func:`once`) under which the script keeps its answer for a while: a rerun of a run that
landed answers what that run did and changes nothing more, and a late copy of the first run
(sent on a connection the client gave up on while Redis stalled) arriving after a rerun that
wrote changes nothing either. If Redis does not answer within the bound, a StateError that says
the outcome is unknown.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from . import write_doubt
from .errors import StateError
from .redis_add_doubt import open_sender, resends
from .redis_encoding import milliseconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("amqp_queue.state.redis")

ANSWER_KEPT = timedelta(minutes=10)
"""How long a set-wide change's answer is kept under its call's token."""


def once() -> list[str]:
    """The arguments a rerunnable script takes last: a fresh token for this call, and how
    long (ms) its answer is kept."""
    return [uuid.uuid4().hex, str(milliseconds(ANSWER_KEPT))]


async def run_rerunnable(
    client: Redis,
    script: AsyncScript,
    keys: Sequence[str],
    args: Sequence[str | bytes],
    action: str,
) -> Any:
    """Runs ``script`` (one that can run again with the same effect) and returns its reply;
    after a lost reply, the reply of a rerun.

    Raises:
        StateError: Redis failed and the script did not run; or, saying its outcome is
            unknown, no rerun got through within the bound.
    """
    from redis.exceptions import BusyLoadingError, RedisError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    sender = client.client()
    try:
        try:
            await open_sender(sender)
        except (RedisError, OSError) as exc:
            raise StateError(f"redis {action} failed: {exc}") from exc
        try:
            return await script(keys=keys, args=args, client=sender)
        except (RedisError, OSError) as exc:
            lost = isinstance(
                exc, RedisConnectionError | RedisTimeoutError | OSError
            ) and not isinstance(exc, BusyLoadingError)
            # A refusal (LOADING while Redis replays its AOF, a script error) ran nothing,
            # unless a client that resends had sent the script before and lost that reply.
            if not (lost or resends(sender)):
                raise StateError(f"redis {action} failed: {exc}") from exc
            failure = StateError(f"redis {action} failed: {exc}")
            failure.__cause__ = exc
    finally:
        await sender.aclose(close_connection_pool=False)
    logger.warning("%s; running it again to find out", failure)
    try:
        async with asyncio.timeout(write_doubt.BOUND):
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((RedisError, OSError)),
                wait=wait_random_exponential(multiplier=0.05, max=0.5),
                reraise=True,
            ):
                with attempt:
                    reply = await script(keys=keys, args=args)
    except (TimeoutError, RedisError, OSError) as exc:
        raise write_doubt.unknown(failure, str(exc) or "timed out") from failure
    return reply
