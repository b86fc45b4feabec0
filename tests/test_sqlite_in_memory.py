"""A SQLite in-memory state index (``sqlite+aiosqlite://``) under concurrent calls.

Found by a helper's public-API probe: the database lives in the one connection its pool
hands to every checkout, and reads did not wait for writes. Three writers beside three
``get_pending`` readers failed 18 to 45 calls a run with "cannot start a transaction within
a transaction", and an enqueue that had returned its id was unknown afterwards in 3 of 5
runs; under ``RabbitMQStore`` a ``consume()`` loop died with it beside an enqueuer and a
canceller. Reads now take their turns with the writes on such a database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path

import pytest

from amqp_queue import CommandExpired, CommandNotFound, CommandStatus, SqlStore
from tests.rabbitmq_support import rabbitmq_store


async def test_reads_beside_writes_fail_nothing_and_lose_nothing() -> None:
    async with await SqlStore.connect("sqlite+aiosqlite://") as store:
        accepted: list[str] = []

        async def write(device: str) -> None:
            for n in range(50):
                accepted.append(await store.enqueue(device, b"%d" % n, 600))

        async def read(device: str) -> None:
            for _ in range(50):
                await store.get_pending(device)
                await store.get_pending_confirmations(device)

        devices = [f"d{n}" for n in range(3)]
        await asyncio.gather(*map(write, devices), *map(read, devices))
        assert len(accepted) == 150
        for command_id in accepted:
            assert await store.get_status(command_id) is CommandStatus.PENDING
        for device in devices:
            assert await store.drain_pending(device) == [b"%d" % n for n in range(50)]


async def test_a_stream_beside_enqueues_and_cancels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rnd = random.Random(4)
    async with rabbitmq_store(tmp_path, state_url="sqlite+aiosqlite://") as store:
        accepted: list[str] = []
        cancelled: set[str] = set()
        got: list[bytes] = []
        produced = asyncio.Event()

        def taken() -> set[str]:
            return {accepted[int(payload)] for payload in got}

        async def gateway() -> None:
            async with store.consume("dev") as stream:
                while not (produced.is_set() and len(cancelled.union(taken())) >= 100):
                    with contextlib.suppress(TimeoutError):
                        got.append((await asyncio.wait_for(anext(stream), 0.3)).payload)

        async def producer() -> None:
            for n in range(100):
                accepted.append(await store.enqueue("dev", b"%03d" % n, 600))
                await asyncio.sleep(rnd.random() * 0.004)
            produced.set()

        async def canceller() -> None:
            while not produced.is_set():
                await asyncio.sleep(rnd.random() * 0.004)
                if accepted:
                    command_id = rnd.choice(accepted)
                    with contextlib.suppress(CommandNotFound, CommandExpired):
                        await store.cancel_command(command_id)
                        cancelled.add(command_id)

        with caplog.at_level(logging.WARNING, logger="amqp_queue"):
            await asyncio.wait_for(asyncio.gather(gateway(), producer(), canceller()), 60)
        assert "transaction within a transaction" not in caplog.text
        assert got == sorted(set(got))  # once each, in order
        statuses = {command_id: await store.get_status(command_id) for command_id in accepted}
        delivered = taken()
        for command_id, status in statuses.items():
            # A cancel that lands between a hand-out's liveness check and the loop body
            # returns, and the command ends DELIVERED (documented in docs/delivery.md).
            if command_id in delivered:
                assert status is CommandStatus.DELIVERED
            else:
                assert status is CommandStatus.CANCELLED
                assert command_id in cancelled
