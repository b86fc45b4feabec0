"""A store's declarations of a device queue and its deletion of it reach the broker one after
the other (``Topology``'s turns, see ``topology._apart``): RabbitMQ 3.10 deleting a classic
queue while another channel declares it again may keep the old consumer on the new queue,
never cancelled. ``tests/test_retire_racing_declare.py`` shows the race end to end, and
passes on a broker without it either way; this checks the turns themselves, on the real
broker, with each call's broker step held open by the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue

from amqp_queue import BrokerError, QueueType, RabbitMQConfig
from amqp_queue.publisher import Publisher
from amqp_queue.state import MemoryStore
from amqp_queue.state.clock import utc_now
from amqp_queue.topology import Topology
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

DEVICE = "dev-1"


class Turns(Topology):
    """Records when each call's broker step begins and ends, and holds it while its gate is
    shut."""

    def __init__(self, channel: AbstractChannel, config: RabbitMQConfig) -> None:
        super().__init__(channel, config)
        self.steps: list[str] = []
        self.gates = {"declare": asyncio.Event(), "delete": asyncio.Event()}
        for gate in self.gates.values():
            gate.set()
        self.fail_delete = False
        real_delete = channel.queue_delete

        async def queue_delete(name: str, **kwargs: Any) -> Any:
            await self._step("delete")
            try:
                if self.fail_delete:
                    raise aio_pika.exceptions.AMQPConnectionError("injected")
                return await real_delete(name, **kwargs)
            finally:
                self.steps.append("delete end")

        channel.queue_delete = queue_delete  # type: ignore[method-assign,assignment]

    async def _step(self, kind: str) -> None:
        self.steps.append(f"{kind} begin")
        await self.gates[kind].wait()

    async def _declared_queue(
        self, channel: AbstractChannel, device_id: str, name: str, robust: bool
    ) -> AbstractQueue:
        await self._step("declare")
        try:
            return await super()._declared_queue(channel, device_id, name, robust)
        finally:
            self.steps.append("declare end")

    @property
    def in_turn(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._using_now, self._deleting_now


@pytest.fixture(params=[QueueType.CLASSIC])
async def turns(request: pytest.FixtureRequest) -> AsyncIterator[Turns]:
    config = RabbitMQConfig(exchange=unique("turns."), publish_timeout=10, queue_type=request.param)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        topology = Turns(await connection.channel(), config)
        await topology.declare_exchange()
        yield topology
    finally:
        await connection.close()
        await delete_namespace(config.exchange, [DEVICE])


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the calls under test run meanwhile
            await asyncio.sleep(0.01)


def _start(call: Awaitable[Any]) -> asyncio.Future[Any]:
    return asyncio.ensure_future(call)


async def test_a_deletion_waits_for_a_declaration_on_the_broker(turns: Turns) -> None:
    turns.gates["declare"].clear()
    declaring = _start(turns.ensure_queue(DEVICE))
    await _until(lambda: "declare begin" in turns.steps)
    deleting = _start(turns.delete_queue(DEVICE))
    await asyncio.sleep(0.2)
    assert turns.steps == ["declare begin"]  # the deletion waits its turn

    turns.gates["declare"].set()
    await asyncio.gather(declaring, deleting)
    assert turns.steps == ["declare begin", "declare end", "delete begin", "delete end"]
    assert turns.in_turn == ({}, {})


async def test_a_declaration_waits_for_a_deletion_and_one_begun_meanwhile(turns: Turns) -> None:
    await turns.ensure_queue(DEVICE)
    turns.steps.clear()
    turns.gates["delete"].clear()
    first = _start(turns.delete_queue(DEVICE))
    await _until(lambda: turns.steps == ["delete begin"])
    declaring = _start(turns.ensure_queue(DEVICE))
    await asyncio.sleep(0.1)
    # A second deletion begun while the declaration waits: it goes before the declaration
    # too (the deletion came later, but the declaration had not reached the broker).
    second = _start(turns.delete_queue(DEVICE))
    await asyncio.sleep(0.1)
    turns.gates["delete"].set()
    await asyncio.gather(first, second, declaring)

    assert turns.steps == [
        "delete begin",
        "delete end",
        "delete begin",
        "delete end",
        "declare begin",
        "declare end",
    ]
    assert turns.in_turn == ({}, {})


async def test_a_declaration_cut_while_it_waits_leaves_no_turn_behind(turns: Turns) -> None:
    turns.gates["delete"].clear()
    deleting = _start(turns.delete_queue(DEVICE))
    await _until(lambda: turns.steps == ["delete begin"])
    channel = turns.channel
    waiting = _start(turns.declare_queue(channel, DEVICE))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    turns.gates["delete"].set()
    await deleting

    assert turns.steps == ["delete begin", "delete end"]
    assert turns.in_turn == ({}, {})
    # The next declaration goes at once.
    await turns.ensure_queue(DEVICE)
    assert turns.steps[-2:] == ["declare begin", "declare end"]


async def test_a_failed_deletion_lets_the_declarations_behind_it_go(turns: Turns) -> None:
    turns.gates["delete"].clear()
    turns.fail_delete = True
    deleting = _start(turns.delete_queue(DEVICE))
    await _until(lambda: turns.steps == ["delete begin"])
    declaring = _start(turns.ensure_queue(DEVICE))
    await asyncio.sleep(0.1)
    turns.gates["delete"].set()

    with pytest.raises(BrokerError):
        await deleting
    await declaring
    assert turns.steps == ["delete begin", "delete end", "declare begin", "declare end"]
    assert turns.in_turn == ({}, {})


async def test_a_deletion_waits_for_a_publish_in_use_of_the_queue(turns: Turns) -> None:
    """On quorum queues a publish past its declaration counts as in use of the queue
    (RabbitMQ 3.10 deleting a quorum queue with a publish to it in flight closes the
    publishing connection, and sometimes leaves the name undeclarable)."""
    await turns.ensure_queue(DEVICE)
    turns.steps.clear()
    released = asyncio.Event()

    async def publishing() -> None:
        with turns.in_use(DEVICE):
            turns.steps.append("publish begin")
            await released.wait()
            turns.steps.append("publish end")

    publish = _start(publishing())
    await _until(lambda: turns.steps == ["publish begin"])
    deleting = _start(turns.delete_queue(DEVICE))
    await asyncio.sleep(0.2)
    assert turns.steps == ["publish begin"]

    released.set()
    await asyncio.gather(publish, deleting)
    assert turns.steps == ["publish begin", "publish end", "delete begin", "delete end"]
    assert turns.in_turn == ({}, {})


@pytest.mark.parametrize("turns", [QueueType.QUORUM], indirect=True)
async def test_a_quorum_publish_whose_queue_deletion_began_after_its_declaration_waits(
    turns: Turns,
) -> None:
    """A publish that met its queue's declaration under way, with a deletion (a retire)
    begun before it resumed: the declaration it waited for no longer stands, and it is
    declared again once the deletion ended, not sent to the queue being deleted (a review
    found it sent between the deletion's start and end). Its message is in the new queue."""
    publisher = Publisher(turns, turns._config, utc_now)
    underlay = await turns.channel.get_underlay_channel()
    real_publish = underlay.basic_publish

    async def basic_publish(*args: Any, **kwargs: Any) -> Any:
        turns.steps.append("publish")
        return await real_publish(*args, **kwargs)

    underlay.basic_publish = basic_publish  # type: ignore[method-assign]
    record = MemoryStore().build(DEVICE, None, b"after the retire", 60)
    turns.gates["declare"].clear()
    publishing = _start(publisher.publish(record))
    await _until(lambda: turns.steps == ["declare begin"])
    turns.gates["delete"].clear()  # the deletion stays under way a while
    turns.gates["declare"].set()
    deleting = _start(turns.delete_queue(DEVICE))
    await _until(lambda: "delete begin" in turns.steps)
    await asyncio.sleep(0.3)
    turns.gates["delete"].set()

    assert await publishing is True
    await deleting
    assert turns.steps == [
        "declare begin",
        "declare end",
        "delete begin",
        "delete end",
        "declare begin",
        "declare end",
        "publish",
    ]
    queue = await turns.channel.declare_queue(turns._config.queue_name(DEVICE), passive=True)
    assert queue.declaration_result.message_count == 1
