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

import logging
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import write_doubt
from .redis_add_doubt import Args, ReplyLost, made, send_once
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
    args: Args,
    action: str,
) -> Any:
    """Runs ``script`` (one that can run again with the same effect) and returns its reply;
    after a lost reply, the reply of a rerun (its arguments made again: the same token).

    Raises:
        StateError: Redis failed and the script did not run; or, saying its outcome is
            unknown, no rerun got through within the bound.
    """
    from redis.exceptions import RedisError

    try:
        return await send_once(client, script, keys, args, action)
    except ReplyLost as lost:
        failure = lost.failure
    logger.warning("%s; running it again to find out", failure)
    try:
        return await write_doubt.within_bound(
            lambda: script(keys=keys, args=made(args)), (RedisError, OSError)
        )
    except (TimeoutError, RedisError, OSError) as exc:
        raise write_doubt.unknown(failure, exc) from failure
