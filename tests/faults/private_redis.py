"""A private redis-server for trials that restart Redis under the stores.

The machine's Redis on 6379 is shared by every other test, so a trial that takes Redis down
starts one of its own: a ``redis-server`` child on a free loopback port, its data in a fresh
directory under the temp dir, with the persistence docs/stores.md ("Redis durability")
promises a returned enqueue survives a crash with: an append-only file fsynced on every
write, no RDB snapshots. Starting one takes a few milliseconds; a restart replays the AOF.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio
import redis.exceptions

from tests.private_broker import _port_free
from tests.support import unique

SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PORTS = range(14_000, 15_000)
"""Below the kernel's ephemeral range, apart from the private RabbitMQ nodes' and PostgreSQL
servers' ports."""

STOPS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
"""How Redis is taken down: SIGKILL (a crash: only what the AOF holds comes back) or SIGTERM
(a clean shutdown: Redis flushes and closes its clients first)."""

_UP_WITHIN = 15.0


class PrivateRedisError(RuntimeError):
    """redis-server did not start (or stop); the message carries its log."""


@dataclass
class PrivateRedis:
    directory: Path
    port: int
    _process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def start(self) -> None:
        """Starts the server (again: same directory, same port) and returns once it answers
        PING, that is once it has replayed its AOF."""
        if self._process is not None and self._process.returncode is None:
            raise PrivateRedisError("the private Redis is running already")
        self.directory.mkdir(parents=True, exist_ok=True)
        # Arguments, not a config file: nothing to clean up beside the data directory.
        args = [
            SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", "redis.log",
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        devnull = asyncio.subprocess.DEVNULL
        self._process = await asyncio.create_subprocess_exec(
            *args, stdin=devnull, stdout=devnull, stderr=devnull
        )
        give_up = time.monotonic() + _UP_WITHIN
        while time.monotonic() < give_up:
            if self._process.returncode is not None:
                raise PrivateRedisError(
                    f"redis-server on port {self.port} exited {self._process.returncode}:\n"
                    f"{self.log[-3000:]}"
                )
            if await _answers_as(self.port, self._process.pid):
                return
            await asyncio.sleep(0.02)
        raise PrivateRedisError(f"redis-server on port {self.port} did not answer:\n{self.log}")

    async def stop(self, mode: str) -> None:
        """Takes the server down with ``STOPS[mode]`` and waits until its process is gone
        (with SIGTERM, Redis closes its clients' connections and flushes its AOF first)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(STOPS[mode])
        try:
            async with asyncio.timeout(_UP_WITHIN):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self, mode: str, down_for: float = 0.0) -> None:
        """Stops the server in ``mode``, keeps it down ``down_for`` seconds so that calls meet
        the outage, and starts it again."""
        await self.stop(mode)
        try:
            await asyncio.sleep(down_for)
        finally:
            await self.start()


async def _answers_as(port: int, pid: int) -> bool:
    """Whether the server on ``port`` is process ``pid`` and takes commands (while it replays
    its AOF it answers ``-LOADING``). Another worker's private server may hold the port while
    this one is down: answering PING, it would have this test talk to that server's data
    while this one's start failed."""
    client = redis.asyncio.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        info = await client.info("server")
        # INFO answers while the AOF replays; PING says LOADING until it is done (a test
        # reading right after a restart met "Redis is loading the dataset in memory").
        await client.ping()
    except (redis.exceptions.RedisError, OSError):  # refused, loading or silent
        return False
    finally:
        await client.aclose()
    return info.get("process_id") == pid


async def _start(directory: Path) -> PrivateRedis:
    for port in random.sample(PORTS, 50):
        if not _port_free(port):
            continue
        server = PrivateRedis(directory, port)
        try:
            await server.start()
        except PrivateRedisError:
            # A probed port can be taken before the server binds it: another one then.
            await server.stop("kill")
            continue
        return server
    raise PrivateRedisError(f"no private Redis could start on a port in {PORTS}")


@asynccontextmanager
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """A fresh private server for the duration of the block; killed and deleted after."""
    directory = Path(tempfile.gettempdir()) / unique("amqp-queue-redis-")
    server: PrivateRedis | None = None
    try:
        server = await _start(directory)
        yield server
    finally:
        if server is not None:
            await server.stop("kill")
        shutil.rmtree(directory, ignore_errors=True)
