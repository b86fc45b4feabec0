"""A drain's two-phase claim on Redis: the claim (through
:class:`~amqp_queue.state.redis_claims.Claims`, which survives a lost reply), the hand-over,
and giving back what claims in doubt took."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING

from .cancellation import cancellation_kept
from .errors import ClaimOutcomeUnknown, StateError
from .model import CommandRecord
from .redis_add_doubt import Args, ReplyLost, send_once
from .redis_claims import Claims, Send, answer_ttl, unexpired
from .redis_encoding import as_text, encode_time

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from .clock import Clock

logger = logging.getLogger("amqp_queue.state.redis")

CUT_CLAIM_WAIT = 1.0
"""Seconds a drain cut while it claimed waits for its claim to be looked up and given back
before it raises."""


class RedisDrainClaims:
    """``_claim`` and ``_hand_over`` of :class:`~amqp_queue.state.redis_store.RedisStore` (a
    mixin of it, which provides the rest)."""

    clock: Clock
    _client: Redis
    _indexes: list[str]
    _claims: Claims
    _claim_script: AsyncScript
    _hand_over_script: AsyncScript
    _end_claims_script: AsyncScript

    if TYPE_CHECKING:  # provided by RedisStore

        def _errors(self, action: str) -> AbstractAsyncContextManager[None]: ...

        def _device_key(self, device_id: str) -> str: ...

        def _args(self, now: datetime, rest: Sequence[str | bytes] = ()) -> list[str | bytes]: ...

        def _args_when_sent(self, now: datetime, rest: Sequence[str | bytes]) -> Args: ...

        async def _release(self, claims: Mapping[str, datetime], *, unpublish: bool) -> int: ...

    async def _claim(
        self, device_id: str, now: datetime, command_ids: Collection[str] | None
    ) -> list[CommandRecord]:
        send = self._claim_sender(device_id, now)
        try:
            taken = await self._claims.claim(device_id, list(command_ids or ()), send)
        except ClaimOutcomeUnknown as exc:
            exc.records = await unexpired(exc.records, now, self._release)
            raise
        try:
            return await unexpired(taken, now, self._release)
        except asyncio.CancelledError:
            # Cut while it gave back what expired since a late lookup: the claim is answered,
            # no longer in doubt, so the rest is given back here, or another store's drain
            # skips it until the lease lapses and hands out later commands first.
            claims = {r.id: r.claimed_until for r in taken if r.claimed_until is not None}
            await _within_cut_wait(device_id, self._release(claims, unpublish=False))
            raise

    def _claim_sender(self, device_id: str, now: datetime) -> Send:
        keys = [*self._indexes, self._device_key(device_id)]

        async def send(
            token: str,
            answered: Sequence[str],
            ids: Sequence[str],
            lookup_only: bool,
            own: Sequence[str],
        ) -> Sequence[Sequence[bytes]]:
            lookup = "1" if lookup_only else "0"
            rest = [token, answer_ttl(), lookup, str(len(answered)), *answered]
            rest += [str(len(own)), *own, *ids]
            with cancellation_kept():
                replies: Sequence[Sequence[bytes]] = await self._claim_script(
                    keys=keys, args=self._args(now, rest)
                )
            return replies

        return send

    async def _settle_all_claims(self) -> None:
        doubtful = self._claims.in_doubt()
        random.shuffle(doubtful)  # a device that keeps failing does not hold the rest back
        for settled, device_id in enumerate(doubtful):
            try:
                await self._settle_claims(device_id)
            except StateError as exc:
                # The rest wait for the next pass (their claims lapse meanwhile, see
                # rules.CLAIM_LEASE): on a stalled link each would wait out the socket
                # timeout, and close() took one per device.
                logger.warning(
                    "redis: lost claims of %d devices stay unsettled (%s: %s)",
                    len(doubtful) - settled,
                    device_id,
                    exc,
                )
                return

    async def _give_back_cut_claim(self, device: str) -> None:
        # The cut claim is the device's doubtful one now (Claims.claim): looked up, and what
        # it took opened again. Should Redis fail or stall meanwhile (given up on after
        # CUT_CLAIM_WAIT: a deadline must still cut a drain while Redis stalls), it stays in
        # doubt for the device's next claim here to look up, as a lost reply's does.
        await _within_cut_wait(device, self._settle_claims(device, cut=True))

    async def _settle_claims(self, device_id: str, *, cut: bool = False) -> None:
        """Gives back what this process's doubtful claims of the device took (see
        :meth:`Claims.settle`), unpublished: a process that read the requeued messages
        meanwhile dropped them as delivered, and a copy is dropped at delivery where a loss
        is not undone. The expired ones end EXPIRED."""

        async def give_back(records: list[CommandRecord]) -> int:
            claims = {r.id: r.claimed_until for r in records if r.claimed_until is not None}
            return await self._release(claims, unpublish=True)

        send = self._claim_sender(device_id, self.clock())
        await self._claims.settle(device_id, send, give_back, cut=cut)

    async def _hand_over(
        self, command_ids: Sequence[str], claimed_until: datetime, now: datetime
    ) -> list[str]:
        # Expiry is decided with the time it is sent, once its connection is held: one that
        # waited for it (or for a busy event loop) hands out nothing that expired meanwhile.
        args = [encode_time(claimed_until), *command_ids]
        try:
            handed = await send_once(
                self._client,
                self._hand_over_script,
                self._indexes,
                self._args_when_sent(now, args),
                "hand-over",
            )
        except ReplyLost as lost:
            # Fails the hand-over: the drain gives its claim back, which opens the commands
            # again if the hand-over did land (nobody received them).
            raise lost.failure from lost.failure.__cause__
        return [as_text(command_id) for command_id in handed]

    async def _end_claims(self, command_ids: Collection[str], now: datetime) -> int:
        async with self._errors("claim end"):
            ended = await self._end_claims_script(
                keys=self._indexes, args=self._args(now, list(command_ids))
            )
        return int(ended)


async def _within_cut_wait(device: str, giving_back: Awaitable[object]) -> None:
    """Runs the give-back of a cut drain's claim for :data:`CUT_CLAIM_WAIT` at most."""
    task = asyncio.ensure_future(giving_back)
    task.add_done_callback(functools.partial(_given_back, device))
    try:
        await asyncio.wait([task], timeout=CUT_CLAIM_WAIT)
    finally:
        task.cancel()


def _given_back(device: str, giving_back: asyncio.Future[object]) -> None:
    if not giving_back.cancelled() and (failure := giving_back.exception()) is not None:
        logger.warning(
            "redis: the claim of a drain of %s cut short was not given back (%s); it stays "
            "in doubt or claimed until its lease lapses",
            device,
            failure,
        )
