"""A bare Redis drain cut while it gives back what a late-looked-up claim took and what
expired meanwhile gives the rest of that claim back too.

Found in the twenty-third session's review: a claim whose replies were lost is looked up at
the device's next drain; what it took that expired since is given back first, and a cut
there left the claim's live commands claimed until the 30 s lease lapsed, so another
store's drain skipped them and handed out the device's later commands first.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from amqp_queue import ClaimOutcomeUnknown
from amqp_queue.state import RedisStore, StateError
from tests.backends import REDIS_URL, redis_prefix
from tests.redis_faults import LosesReplies


class _Faulty(LosesReplies):
    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if type(self).stall and self._targeted():
            type(self).stall = False  # this reply only: the give-back's comes
            try:
                await asyncio.Event().wait()
            except BaseException:
                await self.disconnect(nowait=True)
                raise
        return await super().read_response(*args, **kwargs)


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_a_drain_cut_while_giving_back_expired_commands_gives_back_the_rest() -> None:
    clock = _Clock()
    async with redis_prefix() as prefix:
        a = await RedisStore.connect(
            REDIS_URL, prefix=prefix, connection_class=_Faulty, clock=clock
        )
        b = await RedisStore.connect(REDIS_URL, prefix=prefix, clock=clock)
        try:
            await a.enqueue("dev", b"short", 60)
            await a.enqueue("dev", b"long-1", 600)
            await a.enqueue("dev", b"long-2", 600)
            # Every reply of the claim lost: the drain raises, its claim in doubt.
            _Faulty.only = a._claim_script.sha.encode()
            _Faulty.lose = 100
            with contextlib.suppress(ClaimOutcomeUnknown, StateError):
                await a.drain_pending("dev")
            _Faulty.lose = 0
            clock.now += timedelta(seconds=120)  # the first command has expired
            # The next drain looks the claim up (it took all three) and gives the expired
            # one back; Redis stalls there and the caller's deadline cuts the drain.
            _Faulty.only = a._release_script.sha.encode()
            _Faulty.stall = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await a.drain_pending("dev")
            await b.enqueue("dev", b"later", 600)

            assert await b.drain_pending("dev") == [b"long-1", b"long-2", b"later"]
        finally:
            _Faulty.lose = 0
            _Faulty.stall = False
            _Faulty.only = None
            await a.close()
            await b.close()
