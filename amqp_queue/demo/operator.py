"""The demo's operator: confirms commands over real HTTP, through the operator API.

It reads the fleet-wide confirmation inbox the console's page reads (``GET /confirmations``,
page by page) and confirms what has waited long enough (``POST /commands/{id}/confirm``);
it keeps note of the devices the producer sent a confirmation command to, to know when
everything sent was seen. The standard library's HTTP client
runs in worker threads, so the demo needs no HTTP client package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from amqp_queue.demo.ledger import Ledger


class ApiError(Exception):
    """The operator API answered with an unexpected status."""


class HttpOperator:
    """Confirms what waits for confirmation, through the operator API.

    Args:
        base_url: the API, ``http://host:port``.
        token: a bearer token the API accepts.
        ledger: where confirmations are recorded.
        hold: seconds a command waits before the operator approves it.
    """

    def __init__(self, base_url: str, token: str, ledger: Ledger, *, hold: float) -> None:
        self._base = base_url
        self._token = token
        self._ledger = ledger
        self._hold = hold
        # device -> how often a confirmation command was sent to it; a device is dropped from
        # the watch only if nothing new arrived while its list was being read.
        self._watching: dict[str, int] = {}

    def watch(self, device: str) -> None:
        """A confirmation command was enqueued for ``device``."""
        self._watching[device] = self._watching.get(device, 0) + 1

    @property
    def idle(self) -> bool:
        return not self._watching

    async def run(self, stop: asyncio.Event, interval: float = 0.15) -> None:
        """Confirms commands that waited ``hold`` seconds, until ``stop`` is set."""
        while not stop.is_set():
            await self.sweep(self._hold)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def settle(self) -> None:
        """Confirms everything still waiting, however recent."""
        while not self.idle:
            await self.sweep(0.0)

    async def sweep(self, hold: float) -> None:
        """One pass over the inbox."""
        generations = dict(self._watching)
        waiting = await self.inbox()
        now = datetime.now(UTC)
        for command in waiting:
            age = (now - datetime.fromisoformat(command["created_at"])).total_seconds()
            if age >= hold:
                await self.confirm(command["id"])
        young = {c["device_id"] for c in waiting if c["id"] not in self._ledger.confirm_sent}
        for device, generation in generations.items():
            # Dropped only if nothing new was sent to it while the inbox was being read.
            if device not in young and self._watching.get(device) == generation:
                del self._watching[device]

    async def inbox(self) -> list[dict[str, Any]]:
        """Every command awaiting confirmation, oldest first, read page by page."""
        waiting: list[dict[str, Any]] = []
        path = "/confirmations?limit=500"
        while True:
            page = await self.request("GET", path)
            waiting += page["commands"]
            if page["next"] is None:
                return waiting
            path = f"/confirmations?limit=500&after={page['next']}"

    async def confirm(self, command_id: str) -> None:
        self._ledger.confirm_sent.setdefault(command_id, datetime.now(UTC))
        try:
            await self.request("POST", f"/commands/{command_id}/confirm")
        except ApiError as exc:
            # Superseded (404) or expired (410) since it was listed: nothing to approve.
            if str(exc)[:3] not in ("404", "410"):
                raise
            return
        self._ledger.confirmed.add(command_id)

    async def request(self, method: str, path: str) -> dict[str, Any]:
        """Calls the API with the bearer token; returns the JSON answer.

        Raises:
            ApiError: a status other than 2xx (the message starts with it).
        """
        return await asyncio.to_thread(self._request, method, path)

    def _request(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(
            self._base + path,
            method=method,
            headers={"Authorization": f"Bearer {self._token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer: dict[str, Any] = json.load(response)
                return answer
        except urllib.error.HTTPError as exc:
            raise ApiError(f"{exc.code} {method} {path}: {exc.read().decode()}") from None
