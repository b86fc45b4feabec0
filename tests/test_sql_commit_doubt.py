"""An enqueue whose COMMIT lost its answer: the index never says "not written" of a command
it holds.

Many enqueues run on a PostgreSQL index while the link to the server dies under them: the
server stopped with ``pg_ctl stop -m immediate`` (and started again), or every connection
cut by a proxy in front of it. A commit in flight at that moment may land on the server while
the client only sees its connection die. Each call's payload is unique, so afterwards the
table says which calls were written, and

- every enqueue that returned an id is held under that id;
- no enqueue that raised :class:`StateError` without saying its outcome is unknown is held
  (such a command was later published and delivered: "stale" in the fault harness).

For the cut, commits are slowed (``commit_delay``, what a slow disk does) so that many are in
flight when a cut comes: the server finishes such a commit after the client gave up on it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from amqp_queue.state import SqlStore, StateError
from amqp_queue.state.sql import commit_doubt
from tests.faults.private_pg import PrivatePostgres, private_postgres
from tests.pg_cuts import SLOW_COMMITS, Fault, cutting
from tests.support import eventually
from tests.tcp_proxy import TCPProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WORKERS = 8
SECONDS = 6.0
UNKNOWN = "outcome is unknown"
"""What the message of a StateError says when the index could not tell."""


@dataclass
class Calls:
    returned: dict[bytes, str] = field(default_factory=dict)
    refused: dict[bytes, str] = field(default_factory=dict)
    """Payloads of calls that raised StateError saying nothing was written, with the message."""
    unknown: set[bytes] = field(default_factory=set)


async def _storm(store: SqlStore, inject: Callable[[], Awaitable[None]]) -> Calls:
    """``WORKERS`` enqueue loops with unique payloads while ``inject`` runs, for ``SECONDS``."""
    calls = Calls()
    numbers = itertools.count()
    stop = time.monotonic() + SECONDS

    async def enqueue(worker: int) -> None:
        while time.monotonic() < stop:
            payload = f"payload-{next(numbers)}".encode()
            try:
                calls.returned[payload] = await store.enqueue(f"dev-{worker}", payload, 3600)
            except StateError as exc:
                if UNKNOWN in str(exc):
                    calls.unknown.add(payload)
                else:
                    calls.refused[payload] = str(exc)
                await asyncio.sleep(0.01)

    async def injecting() -> None:
        while time.monotonic() < stop:
            await inject()

    await asyncio.gather(injecting(), *(enqueue(worker) for worker in range(WORKERS)))
    return calls


async def _held(url: str) -> dict[bytes, str]:
    """Every command in the index: payload to id."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.text("SELECT payload, id FROM command_queue"))
            return {bytes(payload): str(command_id) for payload, command_id in rows}
    finally:
        await engine.dispose()


@asynccontextmanager
async def _stopping(server: PrivatePostgres) -> AsyncIterator[Fault]:
    async def inject() -> None:
        await asyncio.sleep(random.uniform(0.2, 0.6))
        await server.restart("immediate", down_for=0.2)

    yield server.url, inject


@pytest.mark.parametrize("fault", ["stop -m immediate", "connection cut"])
async def test_an_enqueue_that_raised_wrote_nothing_and_one_that_returned_is_held(
    fault: str,
) -> None:
    cut = fault == "connection cut"
    async with private_postgres() as server:
        async with (cutting if cut else _stopping)(server) as (url, inject):
            # Slow commits (as on a slow disk): many are in flight when the link is cut.
            store = await SqlStore.connect(url, connect_args=SLOW_COMMITS if cut else {})
            try:
                calls = await _storm(store, inject)
            finally:
                await store.close()
        held = await _held(server.url)

    assert calls.returned, "no enqueue went through"
    assert calls.refused, f"no enqueue met the {fault}"
    lost = {p for p, command_id in calls.returned.items() if held.get(p) != command_id}
    written = {payload: calls.refused[payload] for payload in calls.refused if payload in held}
    assert not lost
    assert not written, (
        f"{len(written)} of {len(calls.refused)} enqueues raised 'not written' yet were "
        f"committed ({len(calls.returned)} returned, {len(calls.unknown)} unknown): "
        f"{sorted(set(written.values()))}"
    )


async def _enqueue_waiting_for_standby(
    store: SqlStore, admin: AsyncEngine
) -> tuple[asyncio.Task[str], bytes]:
    """An enqueue whose COMMIT waits for the synchronous standby, and its payload.

    A server's backends take a configuration reload at their next command, and an enqueue
    may start before its connection did (it then commits at once, as the test command saw
    under load): those are let through and another is sent, until one waits."""
    waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
    async with asyncio.timeout(20):
        for attempt in itertools.count():
            payload = f"held-{attempt}".encode()
            enqueue = asyncio.create_task(store.enqueue("dev-1", payload, 600))
            while not enqueue.done():
                async with admin.connect() as conn:
                    if await conn.scalar(waiting):
                        return enqueue, payload
                await asyncio.sleep(0.05)
            await enqueue  # committed before the reload reached its connection
    raise AssertionError("unreachable")


async def _set_standby(admin: AsyncEngine, names: str | None) -> None:
    async with admin.connect() as conn:
        if names is None:
            await conn.execute(sa.text("ALTER SYSTEM RESET synchronous_standby_names"))
        else:
            await conn.execute(sa.text(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'"))
        await conn.execute(sa.text("SELECT pg_reload_conf()"))


async def test_a_commit_still_under_way_when_its_connection_died_is_reported_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A COMMIT that waits for a synchronous standby which never answers has not landed yet
    # when the client's connection dies, and lands once the wait ends: "not written" would
    # be wrong, and the table alone cannot tell while its server process still runs.
    monkeypatch.setattr(commit_doubt, "BOUND", 1.0)
    async with private_postgres() as server:
        admin = create_async_engine(
            server.url,
            isolation_level="AUTOCOMMIT",
            connect_args={"server_settings": {"synchronous_commit": "local"}},
        )
        try:
            url = make_url(server.url)
            async with TCPProxy(url.port or 5432) as proxy:
                through = url.set(port=proxy.port).render_as_string(hide_password=False)
                store = await SqlStore.connect(through)
                try:
                    await _set_standby(admin, "nobody")
                    enqueue, payload = await _enqueue_waiting_for_standby(store, admin)
                    await proxy.cut()
                    await proxy.restore()
                    with pytest.raises(StateError, match=UNKNOWN):
                        await enqueue
                finally:
                    await store.close()
            await _set_standby(admin, None)  # the wait ends: the commit lands

            async def landed() -> bool:
                return payload in await _held(server.url)

            await eventually(landed, 10)
        finally:
            await admin.dispose()


async def test_an_enqueue_while_postgres_is_down_fails_at_once_with_state_error() -> None:
    # Refused a connection, nothing was sent: no commit to wait on, so no wait for the server.
    async with private_postgres() as server:
        store = await SqlStore.connect(server.url)
        try:
            await store.enqueue("dev-1", b"before", 600)
            await server.stop("immediate")
            started = time.monotonic()
            with pytest.raises(StateError) as raised:
                await store.enqueue("dev-1", b"during", 600)
            assert time.monotonic() - started < 2.0
            assert UNKNOWN not in str(raised.value)
            await server.start()
            # The same store recovers without a restart of the process.
            await eventually(lambda: _enqueues(store), 10)
        finally:
            await store.close()
        held = await _held(server.url)

    assert b"during" not in held
    assert {b"before", b"after"} <= set(held)


async def _enqueues(store: SqlStore) -> bool:
    try:
        await store.enqueue("dev-1", b"after", 600)
    except StateError:
        return False
    return True
