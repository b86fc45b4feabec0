"""Rule 7 under hostile input: the documented error, and nothing written to the state or broker.

Every backend is attacked with generated device ids, command types, payloads, TTLs and command
ids. After each rejected call the state holds no command (``commands_held``) and, for the
RabbitMQ stores, the broker has no queue for the device (a passive declare answers 404); at
the end no queue named after the store's exchange exists at all (``rabbitmqctl``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from amqp_queue import RabbitMQStore
from amqp_queue.state import (
    CommandNotFound,
    CommandStatus,
    InvalidCommandType,
    InvalidDeviceId,
    InvalidPayload,
    InvalidTTL,
    Limits,
    QueueError,
    Store,
)
from tests.backends import BACKENDS, commands_held
from tests.properties.broker_view import BrokerView, queues_named_with_prefix
from tests.properties.hostile import (
    hostile_command_types,
    hostile_device_ids,
    hostile_ttls,
    non_bytes_payloads,
    oversized_payloads,
)
from tests.properties.runner import LoopRunner, property_settings

Call = Callable[[Store], Awaitable[object]]
DEVICE = "dev-ok"
PAYLOAD_LIMIT = 2048


class Target:
    """A store under attack and the checks every rejected call must pass."""

    def __init__(self, runner: LoopRunner, store: Store, broker: BrokerView | None) -> None:
        self.runner = runner
        self.store = store
        self.broker = broker
        self.held = 0

    def rejects(self, error: type[QueueError], call: Call, device: object = DEVICE) -> None:
        async def attempt() -> None:
            with pytest.raises(error) as raised:
                await call(self.store)
            assert isinstance(raised.value, QueueError)
            assert str(raised.value)
            assert await commands_held(self.store) == self.held
            if self.broker is not None and isinstance(device, str):
                assert isinstance(self.store, RabbitMQStore)
                name = self.store.config.queue_name(device)
                assert not await self.broker.queue_exists(name)

        self.runner.run(attempt())

    def rejects_input(self, error: type[QueueError], call: Call, device: object = DEVICE) -> None:
        """Input errors are also ValueError (rule 7)."""
        assert issubclass(error, ValueError)
        self.rejects(error, call, device)


@contextmanager
def attacked(
    backend: str, tmp_path: Path, *, writes: bool = False, **options: Any
) -> Iterator[Target]:
    """Opens the backend's store; unless the test ``writes``, no queue may exist at the end."""
    with LoopRunner() as runner:
        store = runner.enter(BACKENDS[backend](tmp_path, **options))
        broker = runner.enter(BrokerView.open()) if isinstance(store, RabbitMQStore) else None
        yield Target(runner, store, broker)
        if isinstance(store, RabbitMQStore) and not writes:
            # Before the store's teardown deletes the queues it knows of.
            assert queues_named_with_prefix(store.config.queue_prefix) == []


async def _consume(store: Store, device: Any) -> None:
    assert isinstance(store, RabbitMQStore)
    async with store.consume(device):
        pass


async def _ensure_queue(store: Store, device: Any) -> None:
    assert isinstance(store, RabbitMQStore)
    await store.ensure_queue(device)


DEVICE_CALLS: dict[str, Callable[[Store, Any], Awaitable[object]]] = {
    "enqueue": lambda s, d: s.enqueue(d, b"x", 60),
    "enqueue_or_update": lambda s, d: s.enqueue_or_update(d, "t", b"x", 60),
    "enqueue_with_confirmation": lambda s, d: s.enqueue_with_confirmation(d, "t", b"x", 60),
    "get_pending": lambda s, d: s.get_pending(d),
    "get_pending_confirmations": lambda s, d: s.get_pending_confirmations(d),
    "drain_pending": lambda s, d: s.drain_pending(d),
}
RABBITMQ_DEVICE_CALLS = {**DEVICE_CALLS, "consume": _consume, "ensure_queue": _ensure_queue}

TYPED_ENQUEUES: dict[str, Callable[[Store, Any, Any, Any], Awaitable[str]]] = {
    "enqueue_or_update": lambda s, t, p, ttl: s.enqueue_or_update(DEVICE, t, p, ttl),
    "enqueue_with_confirmation": lambda s, t, p, ttl: s.enqueue_with_confirmation(
        DEVICE, t, p, ttl
    ),
}
ENQUEUES: dict[str, Callable[[Store, Any, Any], Awaitable[str]]] = {
    "enqueue": lambda s, p, ttl: s.enqueue(DEVICE, p, ttl),
    "enqueue_or_update": lambda s, p, ttl: s.enqueue_or_update(DEVICE, "t", p, ttl),
    "enqueue_with_confirmation": lambda s, p, ttl: s.enqueue_with_confirmation(DEVICE, "t", p, ttl),
}

backends = pytest.mark.parametrize("backend", sorted(BACKENDS))


@backends
def test_hostile_device_ids_are_rejected_before_anything_is_written(
    backend: str, tmp_path: Path
) -> None:
    with attacked(backend, tmp_path) as target:
        calls = RABBITMQ_DEVICE_CALLS if target.broker is not None else DEVICE_CALLS

        @given(device=hostile_device_ids(), name=st.sampled_from(sorted(calls)))
        @property_settings(30)
        def check(device: object, name: str) -> None:
            target.rejects_input(InvalidDeviceId, lambda s: calls[name](s, device), device)

        check()


@backends
def test_hostile_command_types_are_rejected_before_anything_is_written(
    backend: str, tmp_path: Path
) -> None:
    with attacked(backend, tmp_path) as target:

        @given(kind=hostile_command_types(), name=st.sampled_from(sorted(TYPED_ENQUEUES)))
        @property_settings(20)
        def check(kind: object, name: str) -> None:
            target.rejects_input(
                InvalidCommandType, lambda s: TYPED_ENQUEUES[name](s, kind, b"x", 60)
            )

        check()


@backends
def test_payloads_that_are_not_bytes_or_over_the_limit_are_rejected(
    backend: str, tmp_path: Path
) -> None:
    with attacked(backend, tmp_path, limits=Limits(max_payload_bytes=PAYLOAD_LIMIT)) as target:

        @given(
            payload=st.one_of(non_bytes_payloads(), oversized_payloads(PAYLOAD_LIMIT)),
            name=st.sampled_from(sorted(ENQUEUES)),
        )
        @example(payload=b"x" * (PAYLOAD_LIMIT + 1), name="enqueue")
        @property_settings(20)
        def check(payload: object, name: str) -> None:
            target.rejects_input(InvalidPayload, lambda s: ENQUEUES[name](s, payload, 60))

        check()


@backends
def test_every_payload_within_the_limit_is_delivered_intact(backend: str, tmp_path: Path) -> None:
    limits = Limits(max_payload_bytes=PAYLOAD_LIMIT)
    with attacked(backend, tmp_path, writes=True, limits=limits) as target:

        @given(
            payload=st.binary(max_size=PAYLOAD_LIMIT),
            wrap=st.sampled_from([bytes, bytearray, memoryview]),
        )
        @example(payload=b"", wrap=bytes)
        @example(payload=b"\x00" * PAYLOAD_LIMIT, wrap=bytes)
        @property_settings(10)
        def check(payload: bytes, wrap: Callable[[bytes], Any]) -> None:
            async def round_trip() -> list[bytes]:
                await target.store.enqueue(DEVICE, wrap(payload), 60)
                return await target.store.drain_pending(DEVICE)

            assert target.runner.run(round_trip()) == [payload]

        check()


@backends
def test_hostile_ttls_are_rejected_before_anything_is_written(backend: str, tmp_path: Path) -> None:
    with attacked(backend, tmp_path) as target:

        @given(ttl=hostile_ttls(), name=st.sampled_from(sorted(ENQUEUES)))
        @example(ttl=10**400, name="enqueue")
        @example(ttl=1e-300, name="enqueue")
        @property_settings(30)
        def check(ttl: object, name: str) -> None:
            target.rejects_input(InvalidTTL, lambda s: ENQUEUES[name](s, b"x", ttl))

        check()


@backends
def test_hostile_command_ids_are_not_found_and_change_nothing(backend: str, tmp_path: Path) -> None:
    with attacked(backend, tmp_path, writes=True) as target:
        real = target.runner.run(target.store.enqueue(DEVICE, b"x", 60))
        target.held = 1
        calls: dict[str, Callable[[Store, Any], Awaitable[object]]] = {
            "confirm_command": lambda s, i: s.confirm_command(i),
            "cancel_command": lambda s, i: s.cancel_command(i),
            "get_status": lambda s, i: s.get_status(i),
        }

        @given(
            command_id=st.one_of(
                st.text(),
                st.uuids().map(str),
                st.sampled_from([real.upper(), "{" + real + "}", f"urn:uuid:{real}", "'; --"]),
                st.just(uuid.UUID(real)),
                st.none(),
                st.integers(),
            ),
            name=st.sampled_from(sorted(calls)),
        )
        @property_settings(20)
        def check(command_id: object, name: str) -> None:
            if command_id == real:
                return
            target.rejects(CommandNotFound, lambda s: calls[name](s, command_id), device=None)
            status = target.runner.run(target.store.get_status(real))
            assert status == CommandStatus.PENDING

        check()
