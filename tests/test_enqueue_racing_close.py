"""An enqueue under way while its store closes, then the device's next command elsewhere.

Found by the twenty-second session's probe of stores closed and reopened while producers
enqueue (PostgreSQL, one run in seven): the enqueue's queue declaration met the channel the
close had closed, so the enqueue wrote its command and left it owed to the store's relay,
which was closed already. Another store's relay published it only past ``relay_after``;
the device's next command, enqueued on another store, was published at once and handed out
first. A closing store now waits for the enqueues under way (``publish_timeout`` at most)
before its relay and channels go.

Here the enqueue's declaration is held until the close returned, or for 3 s.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from amqp_queue import RabbitMQStore
from amqp_queue.calls_in_flight import CallsInFlight
from amqp_queue.topology import Topology
from tests.shared_index import drain_until
from tests.test_adversarial_seams import LONG, Env, env_fixture

pytestmark = pytest.mark.timeout(60)

env = env_fixture("closerace.")


def hold_first_declaration(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> tuple[asyncio.Event, asyncio.Event]:
    """Holds the first declaration of ``device``'s queue (set: the first event) until the
    second event is set."""
    declaring = asyncio.Event()
    go_on = asyncio.Event()
    ensure_queue = Topology.ensure_queue

    async def held(topology: Topology, device_id: str, *args: Any, **kwargs: Any) -> Any:
        if device_id == device and not declaring.is_set():
            declaring.set()
            await go_on.wait()
        return await ensure_queue(topology, device_id, *args, **kwargs)

    monkeypatch.setattr(Topology, "ensure_queue", held)
    return declaring, go_on


async def second_goes_after(store: RabbitMQStore, device: str, accepted: object) -> None:
    """Enqueues the device's next command on ``store``: it comes after the first one, unless
    the first call was refused (``accepted`` an exception: nothing written)."""
    await store.enqueue(device, b"second", LONG)
    got = await drain_until(store, device, count=2, seconds=5)
    if isinstance(accepted, BaseException):
        assert got == [b"second"], accepted
    else:
        assert got == [b"first", b"second"]


async def test_an_enqueue_racing_its_stores_close_is_not_overtaken(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = env.device()
    a = await env.open()
    b = await env.open()
    declaring, go_on = hold_first_declaration(monkeypatch, device)
    enqueueing = asyncio.create_task(a.enqueue(device, b"first", LONG))
    await asyncio.wait_for(declaring.wait(), 5)
    closing = asyncio.create_task(a.close())
    await asyncio.wait([closing], timeout=3)
    go_on.set()
    accepted = await asyncio.gather(enqueueing, return_exceptions=True)
    await closing
    await second_goes_after(b, device, accepted[0])


async def test_an_enqueue_racing_a_close_its_caller_cuts_short_is_not_overtaken(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the twenty-seventh session's probe: with the close cut by its caller's
    deadline, the store halted its relay and closed its channels under the enqueue, which
    returned its id with the command owed; the device's next command, enqueued elsewhere,
    went first (SQLite 7 of 30, PostgreSQL up to 7 of 30 rounds)."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    declaring, go_on = hold_first_declaration(monkeypatch, device)
    enqueueing = asyncio.create_task(a.enqueue(device, b"first", LONG))
    await asyncio.wait_for(declaring.wait(), 5)
    asyncio.get_running_loop().call_later(0.3, go_on.set)  # past the close's deadline
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a.close(), 0.05)
    accepted = await asyncio.gather(enqueueing, return_exceptions=True)
    await a.close()
    await second_goes_after(b, device, accepted[0])


async def test_a_close_waits_for_a_stuck_call_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of the fix above: its wait on the way out ran after a whole close too, so a
    close with a call stuck under way took two ``publish_timeout`` where it says one."""
    device = env.device()
    a = await env.open(publish_timeout=1.0)
    stuck = asyncio.Event()
    ensure_queue = Topology.ensure_queue

    async def held(topology: Topology, device_id: str, *args: Any, **kwargs: Any) -> Any:
        if device_id == device:
            stuck.set()
            await asyncio.Event().wait()  # until cancelled
        return await ensure_queue(topology, device_id, *args, **kwargs)

    waits_run_out: list[float] = []
    wait = CallsInFlight.wait

    async def counted_wait(calls: CallsInFlight, within: float) -> None:
        await wait(calls, within)
        if calls._count:
            waits_run_out.append(within)

    monkeypatch.setattr(Topology, "ensure_queue", held)
    monkeypatch.setattr(CallsInFlight, "wait", counted_wait)
    enqueueing = asyncio.create_task(a.enqueue(device, b"stuck", LONG))
    await asyncio.wait_for(stuck.wait(), 5)

    await a.close()

    assert waits_run_out == [1.0]
    enqueueing.cancel()
    await asyncio.gather(enqueueing, return_exceptions=True)
