"""Security: a device gateway's broker credentials reach only its own queue, and nothing
secret (payloads, broker passwords, API tokens) ever reaches a log line or an error message."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq.exceptions
import httpx
import pytest
from yarl import URL

from amqp_queue import RabbitMQConfig, RabbitMQStore
from amqp_queue.errors import BrokerError
from tests.api_support import TOKEN, running
from tests.faults.broker import rabbitmqctl
from tests.rabbitmq_support import AMQP_URL, delete_namespace, rabbitmq_store
from tests.support import unique
from tests.tcp_proxy import TCPProxy

BROKER = "127.0.0.1:5672"
SERVING = r"serving the operator API on (http://\S+)"


@asynccontextmanager
async def broker_user(
    configure: str, write: str, read: str, *, vhost: str = "/"
) -> AsyncIterator[tuple[str, str]]:
    """A broker user with these permission regexes on ``vhost``; deleted afterwards."""
    user, password = unique("test-user-"), unique("pw-")
    await asyncio.to_thread(rabbitmqctl, "add_user", user, password)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", vhost, user, configure, write, read
        )
        yield user, password
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)


@asynccontextmanager
async def tenant_vhost() -> AsyncIterator[str]:
    """A vhost of its own on the machine's broker, where guest (standing in for the tenant's
    sidecar) has every permission; deleted afterwards with all it holds."""
    vhost = unique("test-tenant-")
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
        )
        yield vhost
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)


def _url(user: str, password: str, vhost: str) -> str:
    # The vhost is the URL's path, percent-encoded (a "/" in it would be %2F).
    return f"amqp://{user}:{password}@{BROKER}/{quote(vhost, safe='')}"


async def _take_one(queue: aio_pika.abc.AbstractQueue) -> bytes:
    async with queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message.body
    raise AssertionError("the queue iterator ended")


async def test_a_gateway_user_consumes_its_own_device_queue_and_is_refused_any_other(
    tmp_path: Path,
) -> None:
    async with rabbitmq_store(tmp_path) as store:
        own, other = store.config.queue_name("gw-7"), store.config.queue_name("gw-70")
        await store.enqueue("gw-7", b"for gw-7", 600)
        # gw-70 starts with gw-7: only the anchored regex keeps it out.
        await store.enqueue("gw-70", b"for gw-70", 600)
        read_own_queue = f"^{re.escape(own)}$"

        async with broker_user("^$", "^$", read_own_queue) as (user, password):
            connection = await aio_pika.connect(f"amqp://{user}:{password}@{BROKER}/")
            async with connection:
                channel = await connection.channel()
                queue = await channel.declare_queue(own, passive=True)
                assert await asyncio.wait_for(_take_one(queue), 10) == b"for gw-7"

                channel = await connection.channel()
                foreign = await channel.declare_queue(other, passive=True)
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="ACCESS_REFUSED"):
                    await foreign.consume(_ignore)

                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="ACCESS_REFUSED"):
                    await channel.declare_queue(unique("test.gateway-made-"))

        assert await store.drain_pending("gw-70") == [b"for gw-70"]


async def test_a_gateway_can_passive_declare_another_devices_queue_and_read_its_count(
    tmp_path: Path,
) -> None:
    """The leak the Security section states: read permission on its own queue only, and still a
    passive declare of any queue in the vhost answers whether it exists and how many commands
    wait in it (AMQP checks no permission on a passive declare). A vhost per tenant bounds it
    (the next test)."""
    async with rabbitmq_store(tmp_path) as store:
        own, other = store.config.queue_name("gw-7"), store.config.queue_name("gw-70")
        await store.enqueue("gw-70", b"one", 600)
        await store.enqueue("gw-70", b"two", 600)

        async with (
            broker_user("^$", "^$", f"^{re.escape(own)}$") as (user, password),
            await aio_pika.connect(_url(user, password, "/")) as connection,
        ):
            channel = await connection.channel()
            foreign = await channel.declare_queue(other, passive=True)
            assert foreign.declaration_result.message_count == 2

            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(store.config.queue_name("gw-71"), passive=True)


async def test_with_a_vhost_per_tenant_a_gateway_cannot_see_another_tenants_queues(
    tmp_path: Path,
) -> None:
    """Tenant A's and B's sidecars run on vhosts of their own, with the same exchange name:
    A's gateway finds no trace of B's device queue, and may not open B's vhost at all."""
    exchange = unique("test.")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with tenant_vhost() as vhost_a, tenant_vhost() as vhost_b:
        url_a, url_b = _url("guest", "guest", vhost_a), _url("guest", "guest", vhost_b)
        async with (
            rabbitmq_store(tmp_path / "a", exchange=exchange, amqp_url=url_a) as tenant_a,
            rabbitmq_store(tmp_path / "b", exchange=exchange, amqp_url=url_b) as tenant_b,
        ):
            await tenant_a.enqueue("gw-7", b"for gw-7 of A", 600)
            await tenant_b.enqueue("gw-8", b"for gw-8 of B", 600)
            own, theirs = tenant_a.config.queue_name("gw-7"), tenant_b.config.queue_name("gw-8")
            read_own_queue = f"^{re.escape(own)}$"

            async with broker_user("^$", "^$", read_own_queue, vhost=vhost_a) as (user, pw):
                async with await aio_pika.connect(_url(user, pw, vhost_a)) as connection:
                    channel = await connection.channel()
                    queue = await channel.declare_queue(own, passive=True)
                    assert await asyncio.wait_for(_take_one(queue), 10) == b"for gw-7 of A"

                    # B's queue, by its exact name, does not exist in A's vhost.
                    channel = await connection.channel()
                    with pytest.raises(
                        aio_pika.exceptions.ChannelNotFoundEntity, match=re.escape(theirs)
                    ):
                        await channel.declare_queue(theirs, passive=True)

                # The broker answers Connection.Open on B's vhost with Connection.Close
                # (NOT_ALLOWED, access to vhost refused); aiormq reports it as an invalid frame.
                # Closed here: left to the collector, aio-pika's __del__ schedules its close on
                # whatever loop then runs, and the never-run coroutine was blamed on another test.
                refused = aio_pika.Connection(URL(_url(user, pw, vhost_b)))
                try:
                    with pytest.raises(
                        aiormq.exceptions.InvalidFrameError, match=r"Connection\.Close"
                    ):
                        await refused.connect()
                finally:
                    await refused.close()
                listed = await asyncio.to_thread(
                    rabbitmqctl, "-q", "list_user_permissions", user, "--no-table-headers"
                )
                assert [line.split("\t")[0] for line in listed.splitlines()] == [vhost_a]

            assert await tenant_b.drain_pending("gw-8") == [b"for gw-8 of B"]


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    raise AssertionError("a refused consumer got a message")


OUR_LOGGERS = ("amqp_queue",)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # aiormq logs whole AMQP frames at DEBUG, payloads included (see the README's
        # security notes): of other libraries only INFO and above is held to the rule.
        if record.levelno < logging.INFO and not record.name.startswith(OUR_LOGGERS):
            return
        text = record.getMessage()
        if record.exc_info:
            text += "".join(traceback.format_exception(*record.exc_info))
        self.texts.append(f"{record.name}: {text}")


@contextmanager
def every_log_record() -> Iterator[_Collector]:
    """Every record of every logger, at DEBUG, with formatted tracebacks."""
    collector = _Collector()
    root = logging.getLogger()
    level = root.level
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)
    try:
        yield collector
    finally:
        root.removeHandler(collector)
        root.setLevel(level)


def _chain(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def _store_session(tmp_path: Path, url: str, payload: bytes, proxy: TCPProxy) -> None:
    """Every store operation, an outage with the outbox relay, and a consume."""
    exchange = unique("test.")
    config = RabbitMQConfig(exchange=exchange, publish_timeout=1.0)
    state_url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    store = await RabbitMQStore.connect(url, state_url=state_url, config=config)
    try:
        await store.enqueue("gw-1", payload, 600)
        await store.enqueue_or_update("gw-1", "setpoint", payload, 600)
        unlock = await store.enqueue_with_confirmation("gw-1", "unlock", payload, 600)
        doomed = await store.enqueue("gw-1", payload, 600)
        await store.cancel_command(doomed)
        await proxy.cut()
        await store.confirm_command(unlock)  # published by the relay after the outage
        await store.enqueue("gw-2", payload, 600)
        await proxy.restore()
        got: list[bytes] = []
        async with asyncio.timeout(20):
            while len(got) < 4:
                got += await store.drain_pending("gw-1") + await store.drain_pending("gw-2")
                await asyncio.sleep(0.1)
        await store.enqueue("gw-1", payload, 600)
        async with store.consume("gw-1") as stream:
            async for command in stream:
                assert command.payload == payload
                break
        await store.cleanup()
    finally:
        await store.close()
        await delete_namespace(exchange, ["gw-1", "gw-2"])


async def test_payloads_passwords_and_tokens_never_reach_a_log_line_or_error_message(
    tmp_path: Path,
) -> None:
    payload = unique("payload-secret-").encode()
    async with broker_user(".*", ".*", ".*") as (user, password):
        secrets = [payload.decode(), password, TOKEN]
        with every_log_record() as logs:
            with pytest.raises(BrokerError) as refused:
                await RabbitMQStore.connect(
                    f"amqp://{user}:{password}-wrong@{BROKER}/",
                    state_url="memory://",
                    connect_timeout=1.0,
                )
            async with TCPProxy() as proxy:
                url = f"amqp://{user}:{password}@127.0.0.1:{proxy.port}/?reconnect_interval=0.2"
                await _store_session(tmp_path, url, payload, proxy)
            # Its own state: the session above used tmp_path's with another exchange.
            (tmp_path / "api").mkdir()
            async with running(tmp_path / "api") as api:
                created = await api.enqueue("dev-1", payload=payload.decode())
                assert created.status_code == 201
                command = f"/commands/{created.json()['id']}"
                assert (await api.client.get(command)).status_code == 200
                async with httpx.AsyncClient(base_url=api.url) as anonymous:
                    wrong = {"Authorization": f"Bearer {TOKEN}x"}
                    assert (await anonymous.get(command, headers=wrong)).status_code == 401
                    assert (await anonymous.post("/cleanup", headers=wrong)).status_code == 401

    assert len(logs.texts) > 10  # the run did log: reconnects, the relay, the audit trail
    assert "***" in str(refused.value)
    for text in [*logs.texts, _chain(refused.value)]:
        for secret in secrets:
            assert secret not in text, f"a secret reached the logs: {text[:300]}"


async def test_serve_at_debug_level_logs_no_payload_and_no_token(tmp_path: Path) -> None:
    """The service's own log, at its most verbose, with a broker client that logs frames."""
    exchange, token = unique("test.serve."), unique("token-")
    payload = unique("payload-secret-")
    env = {
        **os.environ,
        "AMQP_URL": AMQP_URL,
        "AMQP_QUEUE_STATE_URL": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        "AMQP_QUEUE_EXCHANGE": exchange,
        "AMQP_QUEUE_BIND": "127.0.0.1:0",
        "AMQP_QUEUE_TOKENS": f"ci:{token}",
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "amqp_queue.cli", "serve", "--log-level", "debug"),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not (found := re.search(SERVING, log[-1] if log else "")):
                log.append((await process.stderr.readline()).decode())
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=found.group(1), headers=headers) as client:
            body = {"payload": payload, "ttl": 600, "mode": "confirm", "command_type": "unlock"}
            created = await client.post("/devices/gw-1/commands", json=body)
            assert created.status_code == 201
            confirmed = await client.post(f"/commands/{created.json()['id']}/confirm")
            assert confirmed.status_code == 200
            assert (await client.get("/devices/gw-1/commands")).status_code == 200
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            log.append((await process.stderr.read()).decode())
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await delete_namespace(exchange, ["gw-1"])

    text = "".join(log)
    assert "DEBUG" in text  # it did log at debug level
    assert payload not in text
    assert token not in text
