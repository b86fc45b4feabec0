"""A store's close ends its outbox relay even when the relay's cancellation is lost on the way,
and a deadline on the close itself is the caller's.

Found by a helper's close/reopen probe on Redis state with quorum queues: a short-lived store's
close() waited for ever (over 60 s in 3 of 11 runs) on its relay task, which was marked as
cancelling yet waited for its next pass, the cancellation lost somewhere in the pass under way
(the broker had just closed the connection with INTERNAL_ERROR). And the close swallowed its own
caller's cancellation while it waited: a deadline around it ran out and the call went on. The
relay now also stops on the store's word, and the close waits for it without taking its
outcome as its own.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from pathlib import Path

import pytest

from amqp_queue import BrokerError
from tests.rabbitmq_support import rabbitmq_store


@pytest.mark.parametrize("deadline", [None, 1.0])
@pytest.mark.parametrize("then", ["returns", "raises BrokerError"])
async def test_close_ends_a_relay_whose_pass_swallowed_its_cancellation(
    tmp_path: Path, deadline: float | None, then: str
) -> None:
    async with rabbitmq_store(tmp_path, relay_interval=60.0) as store:
        relay = store._relay
        assert relay is not None
        in_pass = asyncio.Event()

        async def swallowing_flush() -> int:
            # Two seconds whatever is cancelled, as a library under a pass might take them.
            in_pass.set()
            end = time.monotonic() + 2
            while (left := end - time.monotonic()) > 0:
                with suppress(asyncio.CancelledError):
                    await asyncio.sleep(left)
            if then == "returns":
                return 0
            # What a lost cancel often turns into (aiormq's, under broker_error): retried.
            raise BrokerError("publishing failed: its channel closed under it")

        relay.flush = swallowing_flush  # type: ignore[method-assign]
        relay.kick()
        async with asyncio.timeout(5):
            await in_pass.wait()

        started = time.monotonic()
        if deadline is None:
            async with asyncio.timeout(10):  # the relay's next pass is 60 s away
                await store.close()
        else:
            with pytest.raises(TimeoutError):  # the caller's deadline stands
                async with asyncio.timeout(deadline):
                    await store.close()
            await store.close()  # finishes what is left
        assert relay._task is not None or deadline is None
        if relay._task is not None:  # left running by the close cut short: it ends by itself
            await asyncio.wait([relay._task], timeout=5)
            assert relay._task.done()
        took = time.monotonic() - started

        assert took < 5, f"close took {took:.1f} s"
