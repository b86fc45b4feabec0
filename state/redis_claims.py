"""Drains on Redis that survive a lost reply: a claim sent again answers as it did.

A claim (:data:`~amqp_queue.state.redis_claim_scripts.CLAIM`) holds commands for its drain's
hand-over. When the connection dies while its reply is on the way, the client cannot tell whether
it ran; sent again, a plain claim would find the commands claimed and answer "none left",
and they would be delivered to nobody. So each claim carries a token, and the script keeps
its answer (the ids it took) under that token for :data:`ANSWER_TTL`: the same claim sent
again returns the same commands (and a claim looked up and found never to have run leaves an
empty answer, so a late copy of it, sent on a connection given up on while Redis stalled,
claims nothing). The claim is sent again, with the same token, for
:data:`~amqp_queue.state.write_doubt.BOUND` seconds (a Redis restart or a dropped connection
is over by then, and the drain learns what it took and hands it out). A claim whose reply
stays lost past that raises :class:`~amqp_queue.state.errors.ClaimOutcomeUnknown`, and the
store looks its answer up ahead of the device's next claim, which hands out what it took
(with no answer kept, the claim never ran and its commands are still open). The answer of a
claim whose reply arrived is emptied by the store's next claim and kept one more minute, so
the kept answers stay few and small.

What this cannot cover, when the lost claim had landed: the process ending before the
device's next drain, that drain running in another process (the doubt is this process's
memory), or coming after :data:`ANSWER_TTL`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from .errors import ClaimOutcomeUnknown, StateError
from .model import CommandRecord
from .redis_encoding import decode_replies, encode_time, milliseconds
from .write_doubt import BOUND

logger = logging.getLogger("amqp_queue.state.redis")

ANSWER_TTL = timedelta(minutes=10)
"""How long Redis keeps a claim's answer for the claim to be sent again."""


Send = Callable[
    [str, Sequence[str], Sequence[str], bool, Sequence[str]], Awaitable[Sequence[Sequence[bytes]]]
]
"""Runs the claim script: ``(token, answered tokens, command ids, only look the answer up,
the claim times of what this drain took so far)`` to its replies."""


class Claims:
    """Claim tokens: the answers to delete, and the claims whose outcome is not known yet."""

    def __init__(self) -> None:
        self._answered: list[str] = []
        # By device: claims whose replies were lost, looked up ahead of its next claim.
        self._doubtful: dict[str, list[str]] = {}
        self._settling = asyncio.Lock()

    async def claim(
        self, device_id: str, command_ids: Sequence[str], send: Send
    ) -> list[CommandRecord]:
        """Claims ``command_ids`` of the device (none: all of its open ones), after looking
        up what the device's doubtful claims took, and returns all of it.

        A doubtful claim is only looked up, never run again: with no answer kept it never
        ran, and its commands are still open for this claim or a later one (run now, it
        could take a command whose message another consumer is handing out).

        Raises:
            ClaimOutcomeUnknown: a reply stayed lost; ``records`` holds what the claims
                before it took (hand them out), and the lost one is looked up next time.
            StateError: Redis failed otherwise.
        """
        if device_id in self._doubtful:
            # Not while settle() gives back what the device's doubtful claims took.
            async with self._settling:
                return await self._claim(device_id, command_ids, send)
        return await self._claim(device_id, command_ids, send)

    async def _claim(
        self, device_id: str, command_ids: Sequence[str], send: Send
    ) -> list[CommandRecord]:
        doubtful = self._doubtful.pop(device_id, [])
        pending = [*((token, ()) for token in doubtful), (uuid.uuid4().hex, command_ids)]
        taken: list[CommandRecord] = []
        answered: list[str] = []
        position = 0
        try:
            for position, (token, ids) in enumerate(pending):
                lookup = position < len(doubtful)
                # What the looked-up claims hold is this drain's: its claim does not stop
                # there as at another drain's (rules.held_by_a_claim).
                own = sorted({encode_time(r.claimed_until) for r in taken if r.claimed_until})
                taken.extend(await self._send(token, ids, send, lookup_only=lookup, own=own))
                answered.append(token)
        except (ClaimOutcomeUnknown, StateError) as exc:
            # Still in doubt: the one that failed (if it could have run) and those not sent.
            unsent = doubtful[position:]
            if isinstance(exc, ClaimOutcomeUnknown) and position == len(doubtful):
                unsent.append(pending[-1][0])
            self._keep_doubtful(device_id, unsent)
            self._answered.extend(answered)
            if taken:
                raise ClaimOutcomeUnknown(
                    f"redis drain of {device_id} failed after taking commands: {exc}", taken
                ) from exc
            raise
        except BaseException:
            # Cancelled: what the looked-up claims took never reached the caller, so their
            # answers stay, to be looked up again; the new claim may have run.
            unsent = doubtful if position < len(doubtful) else [*doubtful, pending[-1][0]]
            self._keep_doubtful(device_id, unsent)
            raise
        self._answered.extend(answered)
        return taken

    def in_doubt(self) -> list[str]:
        """The devices with claims whose outcome is not known yet."""
        return list(self._doubtful)

    async def settle(
        self,
        device_id: str,
        send: Send,
        give_back: Callable[[list[CommandRecord]], Awaitable[object]],
        *,
        cut: bool = False,
    ) -> None:
        """Looks up the device's doubtful claims (never runs them) and has ``give_back``
        open again what they took: their drains handed nothing out and requeued the messages,
        which a ``consume`` would otherwise find still claimed. One try each: a read that waits
        on it fails as soon as Redis does, and asks again next time. The tokens stay doubtful
        until what they took is given back, and the device's claims wait meanwhile (a drain
        would otherwise drop those messages as delivered, the tokens gone). ``cut``: the doubt
        is a drain's its caller cut short, an everyday thing logged at INFO, not a lost
        reply."""
        async with self._settling:
            doubtful = list(self._doubtful.get(device_id, ()))
            taken: list[CommandRecord] = []
            for token in doubtful:
                taken.extend(await self._send(token, (), send, lookup_only=True, within=0.0))
            if taken:
                await give_back(taken)
                logger.log(
                    logging.INFO if cut else logging.WARNING,
                    "redis: %d commands of %s taken by a drain %s are open again",
                    len(taken),
                    device_id,
                    "cut short" if cut else "whose reply was lost",
                )
            left = [token for token in self._doubtful.pop(device_id, []) if token not in doubtful]
            self._keep_doubtful(device_id, left)

    def _keep_doubtful(self, device_id: str, tokens: list[str]) -> None:
        if tokens:
            self._doubtful.setdefault(device_id, []).extend(tokens)

    async def _send(
        self,
        token: str,
        ids: Sequence[str],
        send: Send,
        *,
        lookup_only: bool,
        within: float = BOUND,
        own: Sequence[str] = (),
    ) -> list[CommandRecord]:
        # redis-py is optional (see redis_store): imported where it is used.
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # Errors after which the claim may or may not have run on the server.
        doubt = (RedisConnectionError, RedisTimeoutError, OSError)
        answered, self._answered = self._answered, []
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(doubt),
                stop=stop_after_delay(within),
                wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
                reraise=True,
            ):
                with attempt:
                    # Sent again within this drain, the claim may run: its messages are
                    # still this drain's.
                    replies = await send(token, answered, ids, lookup_only, own)
        except doubt as exc:
            logger.warning(
                "redis claim %s: reply lost (%s); looked up at the next drain", token, exc
            )
            raise ClaimOutcomeUnknown(
                f"redis drain failed and may have claimed commands: {exc}; the device's next "
                "drain hands out what it took"
            ) from exc
        except RedisError as exc:
            raise StateError(f"redis drain failed: {exc}") from exc
        return [record for _, record in decode_replies(replies)]


def answer_ttl() -> str:
    """:data:`ANSWER_TTL` as the script's argument."""
    return str(milliseconds(ANSWER_TTL))


async def unexpired(
    records: Sequence[CommandRecord],
    now: datetime,
    release: Callable[..., Awaitable[object]],
) -> list[CommandRecord]:
    """What a claim took, less what expired since: a claim looked up late (its reply was
    lost) took commands that may have expired meanwhile; given back (``release(claims,
    unpublish=False)``), their claims end and they are not handed out."""
    expired = {
        record.id: record.claimed_until
        for record in records
        if record.expires_at <= now and record.claimed_until is not None
    }
    if expired:
        try:
            await release(expired, unpublish=False)
        except StateError as exc:
            # Not handed out all the same; the claim's live commands are.
            logger.warning("redis: %d expired commands stay claimed: %s", len(expired), exc)
    return [record for record in records if record.expires_at > now]
