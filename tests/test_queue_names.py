"""Device queue names: one queue per (exchange, device) pair, within AMQP's 255 bytes.

A queue is named ``<exchange>/<device_id>``; device ids cannot hold ``/``, so no two pairs
share a queue. A device id whose queue name would be over 255 bytes is bad input, refused
before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from amqp_queue import InvalidDeviceId, MemoryStore, OutboxTaken, RabbitMQConfig, RabbitMQStore
from amqp_queue.state.validation import validate_device_id
from tests.backends import commands_held
from tests.rabbitmq_support import queue_depth, rabbitmq_store
from tests.support import unique


def test_a_device_queue_is_named_exchange_slash_device() -> None:
    assert RabbitMQConfig(exchange="fleet.a").queue_name("gw-7") == "fleet.a/gw-7"


def test_no_two_exchange_device_pairs_share_a_queue_name() -> None:
    dotted_device = RabbitMQConfig(exchange="E").queue_name("sub.gw1")
    dotted_exchange = RabbitMQConfig(exchange="E.sub").queue_name("gw1")

    assert dotted_device != dotted_exchange


def test_a_device_id_whose_queue_name_would_pass_255_bytes_is_invalid() -> None:
    config = RabbitMQConfig(exchange="e" * 127)

    assert config.validate_device("d" * 127) == "d" * 127
    with pytest.raises(InvalidDeviceId, match="256 bytes"):
        config.validate_device("d" * 128)


def test_queue_names_count_the_exchange_in_utf8_bytes() -> None:
    config = RabbitMQConfig(exchange="é" * 63)  # 126 bytes

    assert config.validate_device("d" * 128) == "d" * 128
    with pytest.raises(InvalidDeviceId, match="256 bytes"):
        RabbitMQConfig(exchange="é" * 64).validate_device("d" * 127)


def test_device_validation_keeps_the_limits_rules() -> None:
    config = RabbitMQConfig(exchange="fleet")

    for device in ("", "dev/1", "a..b", "amq.x", "d" * 129):
        with pytest.raises(InvalidDeviceId):
            validate_device_id(device, config.limits)
        with pytest.raises(InvalidDeviceId):
            config.validate_device(device)


def test_an_exchange_that_leaves_no_room_for_a_device_id_is_refused() -> None:
    RabbitMQConfig(exchange="e" * 253)
    with pytest.raises(ValueError, match="255 bytes"):
        RabbitMQConfig(exchange="e" * 254)


class _NarrowStore(MemoryStore):
    """A store whose devices must also start with ``gw-`` (the intake's device hook)."""

    def _validate_device(self, device_id: object) -> str:
        device = super()._validate_device(device_id)
        if not device.startswith("gw-"):
            raise InvalidDeviceId(f"{device!r} is not a gateway")
        return device


async def test_a_store_can_tighten_device_validation_for_every_enqueue_and_read() -> None:
    async with _NarrowStore() as store:
        with pytest.raises(InvalidDeviceId):
            await store.enqueue("dev-1", b"x", 60)
        with pytest.raises(InvalidDeviceId):
            await store.enqueue_or_update("dev-1", "t", b"x", 60)
        with pytest.raises(InvalidDeviceId):
            await store.enqueue_with_confirmation("dev-1", "t", b"x", 60)
        with pytest.raises(InvalidDeviceId):
            await store.get_pending("dev-1")
        with pytest.raises(InvalidDeviceId):
            await store.drain_pending("dev-1")
        assert await commands_held(store) == 0
        await store.enqueue("gw-1", b"x", 60)
        assert await store.drain_pending("gw-1") == [b"x"]


async def test_a_dotted_device_and_a_dotted_exchange_get_their_own_commands(
    tmp_path: Path,
) -> None:
    """Exchange E with device sub.gw1 and exchange E.sub with device gw1: separate queues."""
    base = unique("test.")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        rabbitmq_store(tmp_path / "a", exchange=base) as short,
        rabbitmq_store(tmp_path / "b", exchange=f"{base}.sub") as long,
    ):
        await short.enqueue("sub.gw1", b"for E / sub.gw1", 600)
        await long.enqueue("gw1", b"for E.sub / gw1", 600)

        assert await queue_depth(short, "sub.gw1") == 1
        assert await short.drain_pending("sub.gw1") == [b"for E / sub.gw1"]
        assert await long.drain_pending("gw1") == [b"for E.sub / gw1"]
        assert short.config.queue_name("sub.gw1") != long.config.queue_name("gw1")


async def test_a_device_id_too_long_for_its_queue_name_is_refused_before_any_write(
    tmp_path: Path,
) -> None:
    exchange = unique("test.").ljust(127, "x")
    async with rabbitmq_store(tmp_path, exchange=exchange) as store:
        assert isinstance(store, RabbitMQStore)
        device = "d" * 128
        for enqueue in (
            store.enqueue(device, b"x", 60),
            store.enqueue_or_update(device, "t", b"x", 60),
            store.enqueue_with_confirmation(device, "t", b"x", 60),
        ):
            with pytest.raises(InvalidDeviceId):
                await enqueue
        with pytest.raises(InvalidDeviceId):
            await store.ensure_queue(device)
        assert await commands_held(store) == 0
        assert store.declared_devices == []


async def test_two_exchanges_cannot_share_one_state_index(tmp_path: Path) -> None:
    """Each store's relay publishes every unpublished command of its index: on a shared one,
    one exchange's commands would be published into the other's queues."""
    state_url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    async with rabbitmq_store(tmp_path, state_url=state_url) as first:
        await first.enqueue("gw1", b"mine", 600)
        with pytest.raises(OutboxTaken, match=re.escape(first.config.exchange)):
            async with rabbitmq_store(tmp_path, state_url=state_url):
                pass
        async with rabbitmq_store(
            tmp_path, state_url=state_url, exchange=first.config.exchange
        ) as replica:
            assert await replica.drain_pending("gw1") == [b"mine"]
