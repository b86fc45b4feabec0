"""A drain whose device is retired (its queue deleted) while the drain reads the queue.

Found by the twenty-first session's chaos probe: the drain raised ``BrokerError`` ("inspecting
... no queue", or "the broker cancelled its consumer"), SQLite 2 of 2 runs, Redis 1 of 3. It
had claimed nothing; the retire cancels the commands. A drain now treats a deleted queue as
its end: it settles what it read (a command the retire has not cancelled yet is handed over
and returned; a cancelled one is dropped) and returns, as a drain of an empty queue does.
Acks of a deleted queue's deliveries are harmless to the channel.

The retire runs, to its end, from the drain's own reads: from its first window (the broker
then cancels the drain's consumer) or from its look at the queue's depth (gone by then).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from amqp_queue import CommandStatus, RabbitMQStore
from amqp_queue.inbox import Inbox
from tests.rabbitmq_support import AMQP_URL
from tests.test_adversarial_seams import LONG, Env, env_fixture

env = env_fixture("drainretire.")


def retire_before_the_first(
    monkeypatch: pytest.MonkeyPatch, method: str, store: RabbitMQStore, device: str
) -> list[int]:
    """The first call of ``Inbox.<method>`` first retires ``device`` through ``store``."""
    original = getattr(Inbox, method)
    retired: list[int] = []

    async def retire_then(inbox: Inbox, *args: Any, **kwargs: Any) -> Any:
        if not retired:
            retired.append(await store.retire_device(device))
        return await original(inbox, *args, **kwargs)

    monkeypatch.setattr(Inbox, method, retire_then)
    return retired


@pytest.mark.parametrize("method", ["window", "_declared_passively"])
async def test_a_drain_whose_queue_is_deleted_as_it_reads_returns_what_it_could_hand_over(
    env: Env, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    device = env.device()
    a = await env.open()
    b = await env.open()
    ids = [await a.enqueue(device, f"c{n}".encode(), LONG) for n in range(3)]
    retired = retire_before_the_first(monkeypatch, method, a, device)

    drained = await asyncio.wait_for(b.drain_pending(device), 15)

    assert retired == [3]
    monkeypatch.undo()
    # The retire ran to its end before the drain claimed anything: every command cancelled.
    assert drained == []
    assert [await a.get_status(command) for command in ids] == [CommandStatus.CANCELLED] * 3
    # The device goes on: what comes next reaches a new queue and the next drain.
    await a.enqueue(device, b"after the retire", LONG)
    assert await asyncio.wait_for(b.drain_pending(device), 15) == [b"after the retire"]


@pytest.mark.parametrize("method", ["window", "_declared_passively"])
async def test_a_drain_whose_queue_goes_before_the_retire_cancels_hands_the_commands_over(
    env: Env, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """The retire's first step alone (the queue deleted, the commands not cancelled yet):
    the drain claims what it read, and the retire's second step finds them delivered."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    ids = [await a.enqueue(device, f"c{n}".encode(), LONG) for n in range(3)]
    original = getattr(Inbox, method)
    deleted: list[str] = []

    async def delete_then(inbox: Inbox, *args: Any, **kwargs: Any) -> Any:
        if not deleted:
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(inbox.queue.name)
            deleted.append(inbox.queue.name)
        return await original(inbox, *args, **kwargs)

    monkeypatch.setattr(Inbox, method, delete_then)
    drained = await asyncio.wait_for(b.drain_pending(device), 15)
    monkeypatch.undo()

    assert len(deleted) == 1
    assert drained == [b"c0", b"c1", b"c2"]
    assert [await a.get_status(command) for command in ids] == [CommandStatus.DELIVERED] * 3
    assert await a.retire_device(device) == 0
