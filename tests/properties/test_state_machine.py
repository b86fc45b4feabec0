"""Random operation sequences on every backend, compared step by step with the reference model.

Hypothesis drives enqueue / enqueue_or_update / enqueue_with_confirmation / confirm / cancel /
drain / cleanup / get_status (and the pending lists), outcome reports, fan-out and rollouts,
under a small per-device limit, against one store, with a controllable clock it moves as a
rule, and checks each answer against :mod:`tests.properties.model`.
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
    MultipleResults,
    RuleBasedStateMachine,
    initialize,
    multiple,
    rule,
    run_state_machine_as_test,
)

from amqp_queue import RabbitMQStore
from amqp_queue.state import (
    CommandExpired,
    CommandNotFound,
    CommandStatus,
    Limits,
    Store,
)
from tests.backends import BACKENDS, StoreFactory
from tests.properties.model import Model
from tests.properties.runner import LoopRunner, property_settings
from tests.rabbitmq_support import AMQP_URL
from tests.support import FakeClock, unique

Result = TypeVar("Result")

RETENTION = timedelta(seconds=120)
LIMIT = 4  # open commands per device: small, so the machine meets it
TICK = 0.001  # every operation happens a millisecond after the last: no ties in ready order

DEVICES = ["dev-a", "dev-b"]
devices = st.sampled_from(DEVICES)
command_types = st.sampled_from(["setpoint", "unlock"])
payloads = st.binary(max_size=6)
# Fake seconds; real broker TTLs are as long, and one example lasts far less.
ttls = st.sampled_from([30, 90, 600])
jumps = st.sampled_from([1, 20, 45, 100, 700])
outcome_timeouts = st.sampled_from([None, 5, 10])
results = st.one_of(st.none(), st.binary(max_size=4))
reasons = st.sampled_from(["jammed", "low battery"])
fleets = st.lists(st.sampled_from(DEVICES), min_size=1, max_size=2, unique=True)

# Per backend: examples in CI (the broker-backed stores pay for a connection per example).
CI_EXAMPLES = {"memory": 40, "sqlite": 20, "postgres": 15, "redis": 25}


class QueueMachine(RuleBasedStateMachine):
    """One store of one backend against the model; the backend is set by a subclass."""

    factory: StoreFactory
    directory: Path
    commands = Bundle("commands")
    rollouts = Bundle("rollouts")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = Model(RETENTION, LIMIT)
        self.rollout_ids: set[str] = set()
        self.runner = LoopRunner()
        example = self.directory / unique("example-")
        example.mkdir()
        self.store: Store = self.runner.enter(
            self.factory(
                example,
                clock=self.clock,
                retention=RETENTION,
                limits=Limits(max_pending_per_device=LIMIT),
            )
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

    def _enqueued(
        self,
        call: Awaitable[str],
        device: str,
        kind: str | None,
        payload: bytes,
        ttl: int,
        *,
        needs_confirmation: bool = False,
        outcome_timeout: float | None = None,
    ) -> MultipleResults[str]:
        """Runs an enqueue; refused (rule 11) where the model says so, recorded otherwise."""
        refusal = self.model.refusal([(device, kind)], self.clock.now + _tick())
        if refusal is not None:
            self._expect_error(refusal, call)
            return multiple()
        command_id = self._call(call)
        self.model.enqueue(
            command_id,
            device,
            kind,
            payload,
            ttl,
            needs_confirmation,
            self.clock.now,
            outcome_timeout=outcome_timeout,
        )
        return multiple(command_id)

    @rule(target=commands, device=devices, payload=payloads, ttl=ttls, wait=outcome_timeouts)
    def enqueue(
        self, device: str, payload: bytes, ttl: int, wait: float | None
    ) -> MultipleResults[str]:
        call = self.store.enqueue(device, payload, ttl, outcome_timeout=wait)
        return self._enqueued(call, device, None, payload, ttl, outcome_timeout=wait)

    @rule(target=commands, device=devices, kind=command_types, payload=payloads, ttl=ttls)
    def enqueue_or_update(
        self, device: str, kind: str, payload: bytes, ttl: int
    ) -> MultipleResults[str]:
        call = self.store.enqueue_or_update(device, kind, payload, ttl)
        return self._enqueued(call, device, kind, payload, ttl)

    @rule(target=commands, device=devices, kind=command_types, payload=payloads, ttl=ttls)
    def enqueue_with_confirmation(
        self, device: str, kind: str, payload: bytes, ttl: int
    ) -> MultipleResults[str]:
        call = self.store.enqueue_with_confirmation(device, kind, payload, ttl)
        return self._enqueued(call, device, kind, payload, ttl, needs_confirmation=True)

    @rule(
        target=rollouts,
        fleet=fleets,
        kind=st.one_of(st.none(), command_types),
        confirm=st.booleans(),
        payload=payloads,
        ttl=ttls,
    )
    def enqueue_many(
        self, fleet: list[str], kind: str | None, confirm: bool, payload: bytes, ttl: int
    ) -> MultipleResults[str]:
        needs_confirmation = confirm and kind is not None
        call = self.store.enqueue_many(
            fleet, payload, ttl, command_type=kind, requires_confirmation=needs_confirmation
        )
        refusal = self.model.refusal([(device, kind) for device in fleet], self.clock.now + _tick())
        if refusal is not None:
            self._expect_error(refusal, call)
            return multiple()
        rollout = self._call(call)
        assert len(rollout.command_ids) == len(fleet)
        for device, command_id in zip(fleet, rollout.command_ids, strict=True):
            self.model.enqueue(
                command_id,
                device,
                kind,
                payload,
                ttl,
                needs_confirmation,
                self.clock.now,
                rollout=rollout.rollout_id,
            )
        self.rollout_ids.add(rollout.rollout_id)
        return multiple(rollout.rollout_id)

    @rule(rollout=st.one_of(rollouts, st.uuids().map(str)), confirm=st.booleans())
    def settle_rollout(self, rollout: str, confirm: bool) -> None:
        """Confirms or cancels a whole rollout (or an unknown one)."""
        now = self.clock.now + _tick()
        if confirm:
            expected = self.model.confirm_rollout(rollout, now)
            call = self.store.confirm_rollout(rollout)
        else:
            expected = self.model.cancel_rollout(rollout, now)
            call = self.store.cancel_rollout(rollout)
        if isinstance(expected, type):
            self._expect_error(expected, call)
        else:
            assert self._call(call) == expected

    @rule(
        command_id=st.one_of(commands, st.uuids().map(str)),
        succeeded=st.booleans(),
        result=results,
        reason=reasons,
    )
    def report(self, command_id: str, succeeded: bool, result: bytes | None, reason: str) -> None:
        """A gateway reports an outcome (on any command: only a delivered one takes it)."""
        now = self.clock.now + _tick()
        if succeeded:
            expected = self.model.report(command_id, (CommandStatus.SUCCEEDED, result, None), now)
            call = self.store.complete_command(command_id, result)
        else:
            expected = self.model.report(command_id, (CommandStatus.FAILED, None, reason), now)
            call = self.store.fail_command(command_id, reason)
        self._expect_error(expected, call)

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

    @rule(seconds=st.sampled_from([0, 20]))
    def cleanup(self, seconds: int) -> None:
        """Time passes (or not), cleanup runs, and every command's status is as the model's
        (what cleanup ended: expired, timed out, pruned)."""
        self.clock.advance(seconds)
        assert self._call(self.store.cleanup()) == self.model.cleanup(self.clock.now)
        for command_id in list(self.model.commands):
            self._check_status(command_id)

    @rule(command_id=st.one_of(commands, st.uuids().map(str)))
    def status(self, command_id: str) -> None:
        self._check_status(command_id)

    @rule()
    def every_status(self) -> None:
        """Every held command's status and outcome, and every rollout's summary."""
        for command_id in list(self.model.commands):
            self._check_status(command_id)
            self._check_outcome(command_id)
        for rollout in sorted(self.rollout_ids):
            self._check_summary(rollout)

    def _check_summary(self, rollout: str) -> None:
        expected = self.model.summary(rollout, self.clock.now + _tick())
        if isinstance(expected, type):
            self._expect_error(expected, self.store.rollout_summary(rollout))
        else:
            assert dict(self._call(self.store.rollout_summary(rollout)).counts) == expected

    def _check_outcome(self, command_id: str) -> None:
        self.clock.advance(TICK)
        command = self.model.commands.get(command_id)
        got = self.runner.run(_raised_or(self.store.get_outcome(command_id)))
        if command is None:
            assert isinstance(got, CommandNotFound), got
        elif command.report is None:
            assert got is None, got
        else:
            assert got is not None, command_id
            assert not isinstance(got, BaseException), got
            assert (got.status, got.result, got.reason) == command.report
            assert got.reported_at == command.reported_at

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


async def _raised_or(call: Awaitable[Result]) -> Result | BaseException:
    try:
        return await call
    except Exception as exc:
        return exc


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
