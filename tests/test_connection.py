"""connect_robust gives up at its deadline, however the broker fails to answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from amqp_queue.connection import connect_robust, redact
from amqp_queue.errors import BrokerError
from tests.rabbitmq_support import AMQP_URL

DEADLINE = 1.5
# The bound a test allows: the deadline, one last short attempt and a slow CI machine.
GRACE = 3.0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


async def test_a_closed_port_fails_at_the_deadline_naming_the_url_without_its_password() -> None:
    async with asyncio.timeout(DEADLINE + GRACE):
        with pytest.raises(BrokerError) as failed:
            await connect_robust("amqp://ops:hunter2@127.0.0.1:1/", DEADLINE)

    assert "cannot connect to the broker at amqp://ops:***@127.0.0.1:1/" in str(failed.value)
    assert "hunter2" not in str(failed.value)


async def test_a_port_that_never_answers_is_cut_off_at_the_deadline(silent_port: int) -> None:
    async with asyncio.timeout(DEADLINE + GRACE):
        with pytest.raises(BrokerError) as failed:
            await connect_robust(f"amqp://guest:guest@127.0.0.1:{silent_port}/", DEADLINE)

    assert "no answer in" in str(failed.value)


async def test_a_broker_that_is_up_is_connected_at_once() -> None:
    async with asyncio.timeout(GRACE):
        connection = await connect_robust(AMQP_URL, DEADLINE)
    await connection.close()

    assert connection.is_closed


def test_redact_hides_only_the_password() -> None:
    assert redact("amqp://ops:s3cret@broker:5672/v") == "amqp://ops:***@broker:5672/v"
    assert redact("amqp://broker/") == "amqp://broker/"
