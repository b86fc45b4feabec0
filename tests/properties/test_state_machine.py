"""Random operation sequences on every backend, compared step by step with the reference model.

Hypothesis drives enqueue / enqueue_or_update / enqueue_with_confirmation / confirm / cancel /
drain / cleanup / get_status (and the pending lists) against one store, with a controllable
clock it moves as a rule, and checks each answer against :mod:`tests.properties.model`.
CI runs a fixed seed and a few examples; ``AMQP_QUEUE_PROPERTY_EXAMPLES=<n>`` runs more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from amqp_queue import RabbitMQStore
from amqp_queue.state import CommandExpired, CommandNotFound, Store
from tests.backends import BACKENDS, StoreFactory
from tests.properties.model import Model
from tests.properties.runner import LoopRunner, property_settings
from tests.rabbitmq_support import AMQP_URL
from tests.support import FakeClock, unique

Result = TypeVar("Result")

RETENTION = timedelta(seconds=120)
TICK = 0.001  # every operation happens a millisecond after the last: no ties in ready order

DEVICES = ["dev-a", "dev-b"]
devices = st.sampled_from(DEVICES)
command_types = st.sampled_from(["setpoint", "unlock"])
payloads = st.binary(max_size=6)
# Fake seconds; real broker TTLs are as long, and one example lasts far less.
ttls = st.sampled_from([30, 90, 600])
jumps = st.sampled_from([1, 20, 45, 100, 700])

# Per backend: examples in CI (the broker-backed stores pay for a connection per example).
CI_EXAMPLES = {"memory": 40, "sqlite": 20, "postgres": 15, "redis": 25}


class QueueMachine(RuleBasedStateMachine):
    """One store of one backend against the model; the backend is set by a subclass."""

    factory: StoreFactory
    directory: Path
    commands = Bundle("commands")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = Model(RETENTION)
        self.runner = LoopRunner()
        example = self.directory / unique("example-")
        example.mkdir()
        self.store: Store = self.runner.enter(
            self.factory(example, clock=self.clock, retention=RETENTION)
        )
        if isinstance(self.store, RabbitMQStore):
            # Drains and consumers declare queues the store's own clean-up does not know of.
            self.runner.enter(_deleting_queues(self.store))

    def teardown(self) -> None:
        self.runner.close()

    def _call(self, call: Awaitable[Result]) -> Result:
        self.clock.advance(TICK)
        return self.runner.run(_awaited(call))

    def _expect_error(self, expected: type[Exception] | None, call: Awaitable[Any]) -> None:
        self.clock.advance(TICK)
        raised = self.runner.run(_raised(call))
        if expected is None:
            assert raised is None, f"expected success, got {raised!r}"
        else:
            assert isinstance(raised, expected), f"expected {expected.__name__}, got {raised!r}"

    @initialize()
    def start(self) -> None:
        """Nothing to set up; the store is fresh."""

    @rule(target=commands, device=devices, payload=payloads, ttl=ttls)
    def enqueue(self, device: str, payload: bytes, ttl: int) -> str:
        command_id = self._call(self.store.enqueue(device, payload, ttl))
        self.model.enqueue(command_id, device, None, payload, ttl, False, self.clock.now)
        return command_id

    @rule(target=commands, device=devices, kind=command_types, payload=payloads, ttl=ttls)
    def enqueue_or_update(self, device: str, kind: str, payload: bytes, ttl: int) -> str:
        command_id = self._call(self.store.enqueue_or_update(device, kind, payload, ttl))
        self.model.enqueue(command_id, device, kind, payload, ttl, False, self.clock.now)
        return command_id

    @rule(target=commands, device=devices, kind=command_types, payload=payloads, ttl=ttls)
    def enqueue_with_confirmation(self, device: str, kind: str, payload: bytes, ttl: int) -> str:
        command_id = self._call(self.store.enqueue_with_confirmation(device, kind, payload, ttl))
        self.model.enqueue(command_id, device, kind, payload, ttl, True, self.clock.now)
        return command_id

    @rule(command_id=st.one_of(commands, st.uuids().map(str)))
    def confirm(self, command_id: str) -> None:
        call = self.store.confirm_command(command_id)
        self._expect_error(self.model.confirm(command_id, self.clock.now + _tick()), call)

    @rule(command_id=st.one_of(commands, st.uuids().map(str)))
    def cancel(self, command_id: str) -> None:
        call = self.store.cancel_command(command_id)
        self._expect_error(self.model.cancel(command_id, self.clock.now + _tick()), call)

    @rule(device=devices)
    def drain(self, device: str) -> None:
        got = self._call(self.store.drain_pending(device))
        assert got == self.model.drain(device, self.clock.now)

    @rule(device=devices)
    def pending(self, device: str) -> None:
        got = self._call(self.store.get_pending(device))
        assert [c.id for c in got] == self.model.pending(device, self.clock.now)
        for command in got:
            expected = self.model.commands[command.id]
            assert (command.payload, command.command_type) == (
                expected.payload,
                expected.command_type,
            )

    @rule(device=devices)
    def pending_confirmations(self, device: str) -> None:
        got = self._call(self.store.get_pending_confirmations(device))
        assert [c.id for c in got] == self.model.pending_confirmations(device, self.clock.now)

    @rule()
    def cleanup(self) -> None:
        assert self._call(self.store.cleanup()) == self.model.cleanup(self.clock.now)

    @rule(command_id=st.one_of(commands, st.uuids().map(str)))
    def status(self, command_id: str) -> None:
        self._check_status(command_id)

    @rule()
    def every_status(self) -> None:
        for command_id in list(self.model.commands):
            self._check_status(command_id)

    @rule(seconds=jumps)
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    def _check_status(self, command_id: str) -> None:
        self.clock.advance(TICK)
        expected = self.model.status(command_id, self.clock.now)
        got = self.runner.run(_status(self.store, command_id))
        if isinstance(expected, type):
            assert isinstance(got, expected), f"{command_id}: expected {expected}, got {got!r}"
            assert not isinstance(got, CommandExpired)
        else:
            assert got == expected, f"{command_id}: expected {expected}, got {got!r}"


@asynccontextmanager
async def _deleting_queues(store: RabbitMQStore) -> AsyncIterator[None]:
    try:
        yield
    finally:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for device in DEVICES:
                await channel.queue_delete(store.config.queue_name(device))


def _tick() -> timedelta:
    """The model is asked before the call, whose own tick is then already counted."""
    return timedelta(seconds=TICK)


async def _awaited(call: Awaitable[Result]) -> Result:
    return await call


async def _raised(call: Awaitable[Any]) -> BaseException | None:
    try:
        await call
    except Exception as exc:
        return exc
    return None


async def _status(store: Store, command_id: str) -> object:
    try:
        return await store.get_status(command_id)
    except CommandNotFound as exc:
        return exc


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_agrees_with_the_reference_model(backend: str, tmp_path: Path) -> None:
    machine = type(
        f"{backend.title()}Machine",
        (QueueMachine,),
        {"factory": staticmethod(BACKENDS[backend]), "directory": tmp_path},
    )
    examples = CI_EXAMPLES.get(backend, 8)
    run_state_machine_as_test(machine, settings=property_settings(examples, stateful_step_count=30))
