"""What a plain AMQP consumer (pika, on the real broker) sees of the store's messages, as the
documentation states it: ``type`` only on typed commands, ``x-requires-confirmation`` a
boolean, ``timestamp`` in whole seconds, and a replaced command's message still queued
ahead of its replacement (so "keep the latest of each type" goes by queue order)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pika
import pytest

from amqp_queue import RabbitMQStore
from amqp_queue.messages import COMMAND_TYPE, EXPIRES_AT, REQUIRES_CONFIRMATION
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store
from tests.support import FakeClock

Delivered = tuple[bytes, Any]


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[RabbitMQStore]:
    async with rabbitmq_store(tmp_path, clock=clock) as opened:
        yield opened


async def _read_all_with_pika(store: RabbitMQStore, device_id: str) -> list[Delivered]:
    queue = store.config.queue_name(device_id)

    def read() -> list[Delivered]:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            messages: list[Delivered] = []
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return messages
                messages.append((body, properties))
        finally:
            connection.close()

    return await asyncio.to_thread(read)


async def test_what_a_pika_consumer_sees_of_plain_typed_and_confirmed_commands(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    plain = await store.enqueue("dev-1", b"reboot", 60)
    typed = await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)
    unlock = await store.enqueue_with_confirmation("dev-1", "unlock", b"door", 60)
    await store.confirm_command(unlock)

    seen = await _read_all_with_pika(store, "dev-1")

    assert [(body, p.message_id) for body, p in seen] == [
        (b"reboot", plain),
        (b"21", typed),
        (b"door", unlock),
    ]
    assert [p.type for _, p in seen] == [None, "setpoint", "unlock"]
    assert [p.headers.get(COMMAND_TYPE) for _, p in seen] == [None, "setpoint", "unlock"]
    confirmation = [p.headers[REQUIRES_CONFIRMATION] for _, p in seen]
    assert confirmation == [False, False, True]
    assert all(type(value) is bool for value in confirmation)
    expires_ms = math.floor((clock.now.timestamp() + 60) * 1000)
    assert {p.headers[EXPIRES_AT] for _, p in seen} == {expires_ms}
    assert {p.delivery_mode for _, p in seen} == {2}
    assert all(0 < int(p.expiration) <= 60_000 for _, p in seen)
    assert {frozenset(p.headers) for _, p in seen[1:]} == {
        frozenset({COMMAND_TYPE, EXPIRES_AT, REQUIRES_CONFIRMATION})
    }


async def test_timestamps_are_whole_seconds_so_the_latest_goes_by_queue_order(
    store: RabbitMQStore, clock: FakeClock
) -> None:
    clock.advance(0.25)
    first = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
    clock.advance(0.5)
    latest = await store.enqueue_or_update("dev-1", "setpoint", b"21", 60)

    seen = await _read_all_with_pika(store, "dev-1")

    # The replaced command's message is still queued (the store drops it at delivery; a
    # plain consumer sees it): only its place in the queue tells it is the older one.
    assert [(body, p.message_id) for body, p in seen] == [(b"20", first), (b"21", latest)]
    assert [p.timestamp for _, p in seen] == [math.floor(clock.now.timestamp())] * 2
    assert all(isinstance(p.timestamp, int) for _, p in seen)
