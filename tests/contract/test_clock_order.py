"""A store's time is its clock's: a call's time is not run ahead of the clock by real seconds.

Found by the twenty-seventh session's property run (rabbitmq-redis, under load): a
confirmation's time was the clock's reading advanced by the real time the call took until it
held its command (what keeps a wall-clock store from deciding expiry with a stale time).
With a clock of the application's own, that ran ahead of the clock: a command enqueued a
tick after the confirmation returned read as ready before it, and the device got them out
of order. Only the wall clock is advanced so now.
"""

from __future__ import annotations

from amqp_queue import Store
from tests.support import FakeClock


async def test_a_command_confirmed_first_is_ready_first(store: Store, clock: FakeClock) -> None:
    confirmed = await store.enqueue_with_confirmation("dev-1", "setpoint", b"confirmed", 30)
    await store.confirm_command(confirmed)
    clock.advance(0.000001)  # the next call, a microsecond on by the store's clock
    await store.enqueue("dev-1", b"next", 30)

    assert await store.drain_pending("dev-1") == [b"confirmed", b"next"]
