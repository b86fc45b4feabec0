"""Failures say what failed and why, also where the exception itself says nothing.

Found by a helper's probe across broker restarts: a drain raised ``BrokerError('opening a
channel to drain d2 failed: TimeoutError: ')`` (an ``asyncio`` timeout has no text), and the
outbox relay logged ``Retrying <unknown> in 10 seconds as it raised BrokerError: ...`` on
every try of every pass (tenacity cannot name a loop body).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from amqp_queue import BrokerError
from amqp_queue.errors import broker_error
from amqp_queue.outbox import OutboxRelay
from tests.rabbitmq_support import rabbitmq_store
from tests.support import eventually


def test_a_timeout_without_text_says_the_broker_did_not_answer() -> None:
    error = broker_error("opening a channel to drain dev-1", TimeoutError())

    assert str(error) == (
        "opening a channel to drain dev-1 failed: the broker did not answer in time"
    )


async def test_the_relays_retries_name_the_relay_and_warn_once_a_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    flush = OutboxRelay.flush
    tries: list[int] = []

    async def fails_thrice(relay: OutboxRelay) -> int:
        tries.append(len(tries))
        if len(tries) <= 3:
            raise BrokerError("outbox: 1 of 1 publishes failed")
        return await flush(relay)

    caplog.set_level(logging.INFO, logger="amqp_queue.outbox")
    async with rabbitmq_store(tmp_path, relay_interval=0.1):
        monkeypatch.setattr(OutboxRelay, "flush", fails_thrice)

        async def passed() -> bool:
            return len(tries) > 3

        await eventually(passed, 20)

    lines = [r for r in caplog.records if "publishes failed" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO, logging.INFO]
    assert all("outbox relay" in r.getMessage() for r in lines)
    assert not any("<unknown>" in r.getMessage() for r in caplog.records)
