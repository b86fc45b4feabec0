"""consume() hands out commands that report their own outcome (rule 9), and a rollout
fans out over RabbitMQ: published at once, delivered to every device's queue."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiormq
import pytest

from amqp_queue import CommandStatus, RabbitMQStore, ReceivedCommand
from amqp_queue.inbox import Inbox
from amqp_queue.metrics import PrometheusObserver
from tests.rabbitmq_support import queue_depth, rabbitmq_store
from tests.support import eventually


async def test_a_consumed_command_reports_its_outcome_from_the_loop_body(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        done = await store.enqueue("dev-1", b"open door", 60)
        broken = await store.enqueue("dev-1", b"close door", 60)

        async with store.consume("dev-1") as stream:
            async for command in stream:
                assert isinstance(command, ReceivedCommand)
                if command.id == done:
                    await command.complete(b"opened")
                else:
                    await command.fail("jammed")
                    break

        assert await store.get_status(done) == CommandStatus.SUCCEEDED
        assert await store.get_status(broken) == CommandStatus.FAILED
        outcome = await store.get_outcome(done)
        assert outcome is not None
        assert outcome.result == b"opened"
        assert await store.drain_pending("dev-1") == []


async def test_a_command_cancelled_while_the_device_has_it_keeps_its_outcome(
    tmp_path: Path,
) -> None:
    # The cancel came after the hand-out: the device acted on the command all the same, so
    # its report is the truth the index keeps, not a refusal and a CANCELLED that hides it.
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        command_id = await store.enqueue("dev-1", b"x", 60)
        async with store.consume("dev-1") as stream:
            async for command in stream:
                await store.cancel_command(command.id)
                await command.complete(b"done")
                break
        assert await store.get_status(command_id) == CommandStatus.SUCCEEDED


async def test_a_command_replaced_while_the_device_has_it_ends_delivered(
    tmp_path: Path,
) -> None:
    # consume() marks a command once the loop body finished; a replacement coming first
    # (or a mark held up by an index outage) does not make the status lie about it.
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        first = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
        received: list[bytes] = []
        async with store.consume("dev-1") as stream:
            async for command in stream:
                received.append(command.payload)
                if command.id == first:
                    second = await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)
                else:
                    break

        assert received == [b"20", b"21"]
        assert await store.get_status(first) == CommandStatus.DELIVERED
        assert await store.get_status(second) == CommandStatus.DELIVERED


async def test_outcomes_are_counted_in_the_metrics(tmp_path: Path) -> None:
    observer = PrometheusObserver()
    async with rabbitmq_store(tmp_path, observer=observer) as store:
        assert isinstance(store, RabbitMQStore)
        first = await store.enqueue("dev-1", b"a", 60)
        second = await store.enqueue("dev-1", b"b", 60)
        await store.drain_pending("dev-1")
        await store.complete_command(first)
        await store.fail_command(second, "no")

    text = observer.render().decode()
    assert 'amqp_queue_commands_outcomes_total{outcome="succeeded"} 1.0' in text
    assert 'amqp_queue_commands_outcomes_total{outcome="failed"} 1.0' in text


async def test_a_rollout_is_published_to_every_devices_queue_at_once(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        devices = [f"dev-{n}" for n in range(20)]

        rollout = await store.enqueue_many(devices, b"fw", 60)

        assert [await queue_depth(store, device) for device in devices] == [1] * 20
        for device, command_id in zip(devices, rollout.command_ids, strict=True):
            async with store.consume(device) as stream:
                async for command in stream:
                    assert command.id == command_id
                    await command.complete()
                    break
        summary = await store.rollout_summary(rollout.rollout_id)
        assert summary.counts[CommandStatus.SUCCEEDED] == 20


async def test_a_confirmed_rollout_is_published_on_confirmation(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        devices = ["dev-a", "dev-b"]
        rollout = await store.enqueue_many(
            devices, b"fw", 60, command_type="fw", requires_confirmation=True
        )
        assert [await queue_depth(store, device) for device in devices] == [0, 0]

        assert await store.confirm_rollout(rollout.rollout_id) == 2

        assert [await queue_depth(store, device) for device in devices] == [1, 1]


async def test_retiring_a_device_deletes_its_queue(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        command_id = await store.enqueue("dev-old", b"x", 60)
        assert await queue_depth(store, "dev-old") == 1

        assert await store.retire_device("dev-old") == 1

        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await queue_depth(store, "dev-old")
        assert await store.get_status(command_id) == CommandStatus.CANCELLED
        assert "dev-old" not in store.declared_devices


async def test_a_drain_whose_device_retires_while_it_reads_ends_with_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue is deleted under the drain's consumer (the broker cancels it): the drain
    ends at once, as at the end of a queue, without asking a queue that is gone (or one
    declared again) how deep it is, and returns nothing: the retire cancelled every command.
    (It used to raise BrokerError: see tests/test_drain_racing_retire.py.)"""
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 60) for n in range(5)]
        retired: list[int] = []
        reading = Inbox.window

        async def retired_first(inbox: Inbox, wait: float | None, *, fill: int = 1) -> list[Any]:
            if not retired:
                retired.append(await store.retire_device("dev-1"))

                async def cancelled() -> bool:
                    return inbox.cancelled_by_broker

                await eventually(cancelled, 5)
            return await reading(inbox, wait, fill=fill)

        monkeypatch.setattr(Inbox, "window", retired_first)
        assert await asyncio.wait_for(store.drain_pending("dev-1"), 10) == []

        assert retired == [5]
        assert [await store.get_status(c) for c in ids] == [CommandStatus.CANCELLED] * 5
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await queue_depth(store, "dev-1")  # not declared again
