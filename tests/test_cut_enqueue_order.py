"""An enqueue cut short by its caller, then the next command to the device on another store.

Found by the twenty-second session's probe (two producer stores on one index, about 40% of
calls cut with 0-20 ms deadlines): the cut call's command was handed out after the next
call's, sent through another store (SQLite 9 to 12 inversions in each of 3 runs, PostgreSQL 2
in 1 of 3). A cut call whose write landed left its command to its store's outbox relay and
raised at once; the next call, on a store whose relay owed nothing for the device, published
directly and got there first. The design promises ready order per device "also when the
enqueuing call is cancelled". A cut call now raises only once its command is published (or
``publish_timeout`` passed), as a call that returns does.

Here store A's relay takes 0.5 s over its pass, so the order is not left to chance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Any

import pytest

from amqp_queue import RabbitMQStore
from amqp_queue.outbox import OutboxRelay
from amqp_queue.state.model import CommandRecord
from tests.shared_index import drain_until
from tests.test_adversarial_seams import LONG, Env, env_fixture

pytestmark = pytest.mark.timeout(60)

RELAY_TAKES = 0.5


env = env_fixture("cutorder.")


def slow_relays(monkeypatch: pytest.MonkeyPatch) -> None:
    publish = OutboxRelay._publish

    async def slowly(relay: OutboxRelay, records: list[CommandRecord]) -> int:
        await asyncio.sleep(RELAY_TAKES)
        return await publish(relay, records)

    monkeypatch.setattr(OutboxRelay, "_publish", slowly)


def hold_writes(store: RabbitMQStore) -> asyncio.Event:
    """The store's index writes of commands wait 0.2 s once begun; the event says one
    began (the group commit's, or a fan-out's one transaction outside it)."""
    writing = asyncio.Event()
    write = store.state.write

    async def held(records: Sequence[CommandRecord], published: Collection[str]) -> int:
        if records:
            writing.set()
            await asyncio.sleep(0.2)
        return await write(records, published)

    store.state.write = held  # type: ignore[method-assign]
    return writing


@pytest.mark.parametrize("call", ["enqueue", "enqueue_many"])
async def test_a_cut_enqueue_is_not_overtaken_by_the_next_call_on_another_store(
    env: Env, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Cut while its index write is under way: its command is left to the relay."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    slow_relays(monkeypatch)
    writing = hold_writes(a)
    cut: asyncio.Task[Any] = asyncio.create_task(
        a.enqueue(device, b"first", LONG)
        if call == "enqueue"
        else a.enqueue_many([device], b"first", LONG)
    )
    await asyncio.wait_for(writing.wait(), 5)
    await next_call_after_the_cut(cut, b, device)


@pytest.mark.parametrize("branch", ["direct", "relayed"])
async def test_an_enqueue_cut_while_it_publishes_is_not_overtaken(
    env: Env, monkeypatch: pytest.MonkeyPatch, branch: str
) -> None:
    """Cut once written, while its command is published: directly (the broker's confirm
    held 0.5 s), or through the relay (the store's relay holds the device, as behind an
    orphan of a dead process, and takes 0.5 s over its pass)."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    publishing = asyncio.Event()
    if branch == "direct":
        publisher: Any = a._path._publisher
        send = publisher._basic_publish

        async def held(*args: Any) -> Any:
            publishing.set()
            await asyncio.sleep(RELAY_TAKES)
            return await send(*args)

        publisher._basic_publish = held
    else:
        slow_relays(monkeypatch)
        relay: Any = a._path._relay
        relay.holds = lambda device_id: True
        published = relay.published

        async def waited(command_id: str) -> None:
            publishing.set()
            await published(command_id)

        relay.published = waited
    cut = asyncio.create_task(a.enqueue(device, b"first", LONG))
    await asyncio.wait_for(publishing.wait(), 5)
    await next_call_after_the_cut(cut, b, device)


async def next_call_after_the_cut(cut: asyncio.Task[Any], b: RabbitMQStore, device: str) -> None:
    """Cuts ``cut``, then enqueues the device's next command through ``b``: the device gets
    both, the cut one first."""
    cut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cut
    await b.enqueue(device, b"second", LONG)
    got = await drain_until(b, device, count=2, seconds=5)
    assert got == [b"first", b"second"]
