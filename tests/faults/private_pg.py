"""A private PostgreSQL server for trials that restart the database (scripts/pg-node.sh).

The machine's server on 5432 is shared by every other test, so a trial that takes the
database down starts one of its own: ``initdb`` on a directory under the temp dir, a free
loopback port, trust authentication (as root the server runs as the postgres user).
Starting one takes about two seconds; a restart well under one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.private_broker import _port_free
from tests.support import unique

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pg-node.sh"
PORTS = range(13_000, 14_000)
"""Below the kernel's ephemeral range and apart from the private RabbitMQ nodes' ports."""


class PrivatePostgresError(RuntimeError):
    """scripts/pg-node.sh failed; the message carries its output."""


def _script(*args: str, timeout: float = 90.0) -> str:
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise PrivatePostgresError(
            f"pg-node.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


@dataclass(frozen=True)
class PrivatePostgres:
    directory: Path
    url: str
    """A ``postgresql+asyncpg://`` URL of the server's ``postgres`` database."""

    async def stop(self, mode: str) -> None:
        """``pg_ctl stop -m MODE`` (fast: sessions rolled back and closed; immediate: the
        server aborts, crash recovery at the next start)."""
        await asyncio.to_thread(_script, "stop", str(self.directory), mode)

    async def start(self) -> None:
        """Starts the stopped server again (same data, same port); returns once it accepts
        connections."""
        await asyncio.to_thread(_script, "start_again", str(self.directory))

    async def restart(self, mode: str, down_for: float = 0.0) -> None:
        """What ``pg_ctl restart -m MODE`` does, with ``down_for`` seconds between the stop
        and the start so that calls meet the outage."""
        await self.stop(mode)
        try:
            await asyncio.sleep(down_for)
        finally:
            await self.start()


def _start(directory: Path) -> PrivatePostgres:
    for port in random.sample(PORTS, 50):
        if not _port_free(port):
            continue
        try:
            url = _script("start", str(directory), str(port)).strip().splitlines()[-1]
        except PrivatePostgresError:
            # A probed port can be taken before the server binds it: another one then.
            _script("remove", str(directory))
            continue
        return PrivatePostgres(directory, url)
    raise PrivatePostgresError(f"no private PostgreSQL could start on a port in {PORTS}")


@asynccontextmanager
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    """A fresh private server for the duration of the block; stopped and deleted after."""
    directory = Path(tempfile.gettempdir()) / unique("amqp-queue-pg-")
    try:
        yield await asyncio.to_thread(_start, directory)
    finally:
        with contextlib.suppress(PrivatePostgresError):
            await asyncio.to_thread(_script, "remove", str(directory))
