"""The operator API on a real socket (uvicorn, ephemeral port), over the real broker and state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from amqp_queue.auth import Tokens
from amqp_queue.config import RabbitMQConfig
from amqp_queue.service import Backends, running_api
from amqp_queue.settings import Settings
from amqp_queue.state.clock import Clock, utc_now
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

TOKEN = "s3cret-operator-token-0123456789"
OTHER_TOKEN = "another-token-for-the-auditor"


@dataclass
class Api:
    """A running API, a client that sends the operator's token, and the backends behind it."""

    client: httpx.AsyncClient
    backends: Backends
    url: str

    async def enqueue(self, device: str, **body: Any) -> httpx.Response:
        body.setdefault("payload", "reboot")
        body.setdefault("ttl", 60)
        return await self.client.post(f"/devices/{device}/commands", json=body)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    options: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "state_url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        "rabbitmq": RabbitMQConfig(exchange=unique("test.api.")),
        "tokens": Tokens({"alice": TOKEN, "bob": OTHER_TOKEN}),
        "max_body_bytes": 64 * 1024,
        **overrides,
    }
    return Settings(**options)


@asynccontextmanager
async def running(
    tmp_path: Path, *, clock: Clock = utc_now, **overrides: Any
) -> AsyncIterator[Api]:
    """The API over its own namespace; ``clock`` is the index's time source."""
    settings = settings_for(tmp_path, **overrides)
    try:
        async with (
            await Backends.open(settings, clock=clock) as backends,
            running_api(backends) as url,
        ):
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
                yield Api(client, backends, url)
    finally:
        await delete_namespace(settings.exchange, [f"dev-{n}" for n in range(1, 4)])
