"""The private Redis server the restart trials take down and start again.

A helper session noted that while a trial's server is down, another pytest process's private
server may take its port (both pick from the same range): the restarted server then failed to
bind and exited, but the start returned as soon as something on the port answered PING, and the
trial went on against the other server's data. A start now waits for its own process to answer.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.faults.private_redis import PrivateRedis, PrivateRedisError, private_redis
from tests.support import unique


async def test_a_restart_whose_port_another_server_took_fails_rather_than_use_that_server() -> None:
    async with private_redis() as ours:
        await ours.stop("term")
        directory = Path(tempfile.gettempdir()) / unique("amqp-queue-redis-")
        squatter = PrivateRedis(directory, ours.port)
        try:
            await squatter.start()
            with pytest.raises(PrivateRedisError, match="exited"):
                await ours.start()
        finally:
            await squatter.stop("kill")
            shutil.rmtree(directory, ignore_errors=True)
