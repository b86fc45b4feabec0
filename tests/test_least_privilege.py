"""The sidecar's broker user from rabbitmq/definitions.json has least privilege: proven on a
private node that loads the file at boot (``load_definitions``, as docker-compose.yml's broker
does), so the definitions, users and permissions tried here are exactly the committed ones.

The user can run a RabbitMQStore on its exchange (enqueue, publish, drain, consume, confirm)
and is refused every exchange and queue outside ``<exchange>`` and ``<exchange>/...``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
import pytest

from amqp_queue import CommandStatus, QueueError, RabbitMQConfig, RabbitMQStore
from tests.private_broker import (
    PrivateBroker,
    _script,
    free_port_pair,
    remove_node,
    start_node,
)
from tests.support import unique

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = ROOT / "rabbitmq" / "definitions.json"
# The user, password and vhost docker-compose.yml's sidecar logs in with.
SIDECAR = ("amqp_queue", "amqp_queue")
Refused = aiormq.exceptions.ChannelAccessRefused


def _definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text())
    return loaded


EXCHANGE = _definitions()["exchanges"][0]["name"]


def _ctl(broker: PrivateBroker, *args: str) -> str:
    return _script("ctl", broker.name, *args)


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateBroker]:
    """A private node booted with the committed definitions.json and nothing else."""
    # The node may run as the rabbitmq user: the file goes where that user can read it.
    folder = Path(tempfile.mkdtemp(prefix="amqpq-defs-"))
    folder.chmod(0o755)
    copy = folder / "definitions.json"
    shutil.copyfile(DEFINITIONS, copy)
    copy.chmod(0o644)
    name = unique("amqpq-defs-")
    try:
        node = start_node(name, free_port_pair(), extra_conf=f"load_definitions = {copy}")
        yield node
    finally:
        remove_node(name)
        shutil.rmtree(folder)


def _as_sidecar(broker: PrivateBroker) -> str:
    """The node's URL with the sidecar's credentials (its own is guest's, who does not exist
    on a node that loaded definitions at boot)."""
    parts = urlsplit(broker.amqp_url)
    user, password = SIDECAR
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.fixture
async def connection(broker: PrivateBroker) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    async with await aio_pika.connect(_as_sidecar(broker)) as opened:
        yield opened


def test_the_node_loaded_the_committed_definitions(broker: PrivateBroker) -> None:
    users = json.loads(_ctl(broker, "list_users", "--formatter", "json"))
    permissions = json.loads(
        _ctl(broker, "list_user_permissions", SIDECAR[0], "--formatter", "json")
    )
    (expected,) = _definitions()["permissions"]

    # No guest, no administrator: the sidecar's user is the only one and has no tag at all.
    assert users == [{"user": SIDECAR[0], "tags": []}]
    assert permissions == [{key: expected[key] for key in ("vhost", "configure", "write", "read")}]


async def test_the_sidecar_user_runs_the_store_on_its_exchange(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    device = unique("gw-")
    store = await RabbitMQStore.connect(
        _as_sidecar(broker),
        state_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        config=RabbitMQConfig(exchange=EXCHANGE),
        connect_timeout=10,
    )
    async with store:
        await store.enqueue(device, b"first", 600)
        async with store.consume(device) as stream:
            async for command in stream:
                assert command.payload == b"first"
                break
        await store.enqueue_or_update(device, "setpoint", b"latest", 600)
        unlock = await store.enqueue_with_confirmation(device, "unlock", b"unlock", 600)
        await store.confirm_command(unlock)
        assert await store.drain_pending(device) == [b"latest", b"unlock"]
        assert await store.get_status(unlock) == CommandStatus.DELIVERED
        await store.cleanup()

    queues = _ctl(broker, "-q", "list_queues", "name", "policy", "--no-table-headers")
    policy = _definitions()["policies"][0]["name"]
    # The lazy-queue policy reached the queue the library declared.
    assert f"{EXCHANGE}/{device}\t{policy}" in queues.splitlines()


@pytest.mark.parametrize(
    "exchange",
    ["other.commands", f"{EXCHANGE}.sub", f"{EXCHANGE}x", f"x{EXCHANGE}", "amq.direct"],
)
async def test_the_sidecar_user_is_refused_any_other_exchange(
    connection: aio_pika.abc.AbstractConnection, exchange: str
) -> None:
    channel = await connection.channel()
    with pytest.raises(Refused, match="ACCESS_REFUSED"):
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.DIRECT, durable=True)


@pytest.mark.parametrize(
    "queue",
    [
        "other.commands/gw-1",
        f"{EXCHANGE}.sub/gw-1",
        f"{EXCHANGE}x/gw-1",
        f"x{EXCHANGE}/gw-1",
        "gw-1",
    ],
)
async def test_the_sidecar_user_is_refused_queues_outside_its_prefix(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> None:
    channel = await connection.channel()
    with pytest.raises(Refused, match="ACCESS_REFUSED"):
        await channel.declare_queue(queue, durable=True)


async def test_the_sidecar_user_cannot_publish_or_bind_outside_its_exchange(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    own = await channel.declare_queue(f"{EXCHANGE}/{unique('gw-')}", durable=True)
    try:
        # Read on amq.direct (the binding's source) is not granted.
        with pytest.raises(Refused, match="ACCESS_REFUSED"):
            await own.bind("amq.direct", routing_key="x")

        # The default exchange (write on amq.default) routes by queue name: refused too, so
        # the sidecar cannot put a message into a queue by going around its exchange.
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(Refused, match="ACCESS_REFUSED"):
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=own.name)
    finally:
        channel = await connection.channel()
        await channel.queue_delete(own.name)


async def test_a_store_on_another_exchange_is_refused_with_a_clear_error(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    # connect() closes what it opened when it raises.
    with pytest.raises(QueueError, match="ACCESS_REFUSED"):
        await RabbitMQStore.connect(
            _as_sidecar(broker),
            state_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
            config=RabbitMQConfig(exchange="other.commands"),
            connect_timeout=10,
        )
