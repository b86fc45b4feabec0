"""A PostgreSQL link that stalls (no reset: every byte held, as a dead peer or a hung proxy
does) used to hold every call on it without bound: no statement had a timeout. Found by an
adversarial helper (tests/test_adversarial_fifth_wire.py). Each statement now has asyncpg's
``command_timeout`` (:data:`~amqp_queue.state.sql.engine.COMMAND_TIMEOUT` unless the URL sets
one), each new connection a connect timeout, and a call past either fails with ``StateError``.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.engine import make_url

from amqp_queue import RabbitMQConfig, RabbitMQStore, StateError
from amqp_queue.state import SqlStore
from amqp_queue.state.sql.engine import COMMAND_TIMEOUT
from tests.backends import POSTGRES_URL, postgres_schema
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique
from tests.tcp_proxy import LOOPBACK, StallProxy


async def test_a_postgres_index_bounds_every_statement_by_default() -> None:
    async with postgres_schema() as schema:
        store = await SqlStore.connect(POSTGRES_URL, schema=schema)
        try:
            async with store.engine.connect() as connection:
                raw = await connection.get_raw_connection()
                # asyncpg keeps it in its private config; no public accessor.
                timeout = raw.driver_connection._config.command_timeout  # type: ignore[union-attr]
            assert timeout == COMMAND_TIMEOUT
            # The connect timeout is not kept; the pool's creator passes it on every connect.
        finally:
            await store.close()


async def test_calls_on_a_stalled_postgres_link_fail_with_state_error_then_recover() -> None:
    exchange = unique("stall.")
    async with (
        StallProxy(make_url(POSTGRES_URL).port or 5432) as proxy,
        postgres_schema() as schema,
    ):
        url = (
            make_url(POSTGRES_URL)
            .set(host=LOOPBACK, port=proxy.port)
            .update_query_dict({"schema": schema, "command_timeout": "1", "timeout": "2"})
            .render_as_string(hide_password=False)
        )
        store = await RabbitMQStore.connect(
            AMQP_URL, state_url=url, config=RabbitMQConfig(exchange=exchange)
        )
        try:
            first = await store.enqueue("gw-1", b"before", 600)
            proxy.stall()
            for call in (store.enqueue("gw-1", b"during", 600), store.get_status(first)):
                started = time.monotonic()
                try:
                    await asyncio.wait_for(call, 20)
                except StateError:
                    pass
                else:
                    raise AssertionError("a call on a stalled link answered")
                assert time.monotonic() - started < 10
            proxy.resume()
            pending = await store.get_pending("gw-1")
            assert pending[0].payload == b"before"
            assert await store.enqueue("gw-1", b"after", 600)
        finally:
            proxy.resume()
            await asyncio.wait_for(store.close(), 30)
            await delete_namespace(exchange, ["gw-1"])
