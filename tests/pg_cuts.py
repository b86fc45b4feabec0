"""Connections to a private PostgreSQL cut while commits are in flight (tests of commit doubt).

Commits are slowed (``commit_delay``, what a slow disk does) so that many are in flight when
a cut comes: the server finishes such a commit after the client gave up on it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.engine import make_url

from tests.faults.private_pg import PrivatePostgres
from tests.tcp_proxy import TCPProxy

SLOW_COMMITS: dict[str, Any] = {
    "server_settings": {"commit_delay": "50000", "commit_siblings": "0"}
}
"""``connect_args`` of an engine whose sessions' commits wait 50 ms before their flush."""

Fault = tuple[str, Callable[[], Awaitable[None]]]
"""The URL the store opens, and one injection of the fault (it waits a moment first)."""


@asynccontextmanager
async def cutting(server: PrivatePostgres) -> AsyncIterator[Fault]:
    """A proxy in front of ``server``; each injection cuts every connection through it."""
    url = make_url(server.url)
    async with TCPProxy(url.port or 5432, max_connections=100) as proxy:

        async def inject() -> None:
            await asyncio.sleep(random.uniform(0.1, 0.3))
            await proxy.cut()
            await proxy.restore()

        yield url.set(port=proxy.port).render_as_string(hide_password=False), inject
