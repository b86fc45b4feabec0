"""Every row of the operator API's status table, over HTTP against the real app.

For a command in each status: what ``GET /commands/{id}``, ``POST .../confirm`` and
``POST .../cancel`` answer, that a refusal changes nothing, and that only a confirm which
approves a command awaiting it counts in ``amqp_queue_commands_confirmed_total``
(docs/design.md rules 4, 5 and 8: confirming twice is harmless; cancelling a delivered or
finished command is ``CommandNotFound``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from tests.api_support import Api, running
from tests.backends import POSTGRES_URL, REDIS_URL, postgres_schema, redis_prefix
from tests.support import FakeClock

UNKNOWN = "00000000-0000-0000-0000-000000000042"
CONFIRMED_TOTAL = "amqp_queue_commands_confirmed_total"

Make = Callable[[Api, str], Awaitable[str]]
"""Puts a command of one device into the row's status; returns its id."""


async def _enqueued(api: Api, device: str, **body: object) -> str:
    response = await api.enqueue(device, **body)
    assert response.status_code == 201, response.text
    command_id: str = response.json()["id"]
    return command_id


def _advance(api: Api, seconds: float) -> None:
    """Moves the index's clock on: expiry and outcome deadlines without sleeping."""
    clock = api.backends.store.state.clock
    assert isinstance(clock, FakeClock)
    clock.advance(seconds)


async def _ok(api: Api, command_id: str, action: str) -> None:
    response = await api.client.post(f"/commands/{command_id}/{action}")
    assert response.status_code == 200, response.text


async def awaiting(api: Api, device: str) -> str:
    return await _enqueued(api, device, mode="confirm", command_type="unlock")


async def confirmed(api: Api, device: str) -> str:
    command_id = await awaiting(api, device)
    await _ok(api, command_id, "confirm")
    return command_id


async def plain(api: Api, device: str) -> str:
    return await _enqueued(api, device)


async def latest(api: Api, device: str) -> str:
    return await _enqueued(api, device, mode="latest", command_type="setpoint")


async def delivered(api: Api, device: str) -> str:
    command_id = await plain(api, device)
    assert await api.backends.store.drain_pending(device) == [b"reboot"]
    return command_id


async def delivered_after_confirmation(api: Api, device: str) -> str:
    command_id = await confirmed(api, device)
    assert await api.backends.store.drain_pending(device) == [b"reboot"]
    return command_id


async def succeeded(api: Api, device: str) -> str:
    command_id = await delivered(api, device)
    report = {"outcome": "succeeded", "result": "done"}
    response = await api.client.post(f"/commands/{command_id}/outcome", json=report)
    assert response.status_code == 200, response.text
    return command_id


async def failed(api: Api, device: str) -> str:
    command_id = await delivered(api, device)
    report = {"outcome": "failed", "reason": "jammed"}
    response = await api.client.post(f"/commands/{command_id}/outcome", json=report)
    assert response.status_code == 200, response.text
    return command_id


async def timed_out(api: Api, device: str) -> str:
    command_id = await _enqueued(api, device, outcome_timeout=0.2)
    assert await api.backends.store.drain_pending(device) == [b"reboot"]
    _advance(api, 0.3)
    await api.client.post("/cleanup")
    return command_id


async def expired(api: Api, device: str) -> str:
    command_id = await _enqueued(api, device, ttl=0.2)
    _advance(api, 0.3)
    return command_id


async def expired_and_cleaned_up(api: Api, device: str) -> str:
    command_id = await expired(api, device)
    assert (await api.client.post("/cleanup")).json() == {"expired": 1}
    return command_id


async def cancelled(api: Api, device: str) -> str:
    command_id = await plain(api, device)
    await _ok(api, command_id, "cancel")
    return command_id


async def superseded(api: Api, device: str) -> str:
    command_id = await latest(api, device)
    await latest(api, device)
    return command_id


async def rejected(api: Api, device: str) -> str:
    # As the outbox ends a command the broker refused for good (a real refusal needs a
    # message over the broker's 128 MiB limit: tests/test_rejected_commands.py).
    command_id = await awaiting(api, device)
    assert await api.backends.store.state.reject([command_id]) == 1
    return command_id


async def pruned(api: Api, device: str) -> str:
    command_id = await cancelled(api, device)
    state = api.backends.store.state
    assert await state.prune(state.clock() + timedelta(seconds=1)) == 1
    return command_id


async def unknown(api: Api, device: str) -> str:
    return UNKNOWN


async def not_a_uuid(api: Api, device: str) -> str:
    return "not-a-uuid"


@dataclass(frozen=True)
class Row:
    """One row: the status GET answers (None: 404), then confirm's and cancel's answers as
    (HTTP status, the status in a 200's body or the error code)."""

    make: Make
    status: str | None
    confirm: tuple[int, str]
    cancel: tuple[int, str]
    confirm_counts: bool = False


NOT_FOUND = (404, "not_found")
ROWS = [
    Row(awaiting, "awaiting_confirmation", (200, "pending"), (200, "cancelled"), True),
    Row(confirmed, "pending", (200, "pending"), (200, "cancelled")),
    Row(plain, "pending", (200, "pending"), (200, "cancelled")),
    Row(latest, "pending", (200, "pending"), (200, "cancelled")),
    Row(delivered, "delivered", (200, "delivered"), NOT_FOUND),
    Row(delivered_after_confirmation, "delivered", (200, "delivered"), NOT_FOUND),
    Row(succeeded, "succeeded", (200, "succeeded"), NOT_FOUND),
    Row(failed, "failed", (200, "failed"), NOT_FOUND),
    Row(timed_out, "timed_out", (200, "timed_out"), NOT_FOUND),
    Row(expired, "expired", (410, "expired"), (410, "expired")),
    Row(expired_and_cleaned_up, "expired", (410, "expired"), (410, "expired")),
    Row(cancelled, "cancelled", NOT_FOUND, NOT_FOUND),
    Row(superseded, "superseded", NOT_FOUND, NOT_FOUND),
    Row(rejected, "rejected", NOT_FOUND, NOT_FOUND),
    Row(pruned, None, NOT_FOUND, NOT_FOUND),
    Row(unknown, None, NOT_FOUND, NOT_FOUND),
    Row(not_a_uuid, None, NOT_FOUND, NOT_FOUND),
]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running(tmp_path, clock=FakeClock()) as opened:
        yield opened


async def _status(api: Api, command_id: str) -> str | None:
    response = await api.client.get(f"/commands/{command_id}")
    if response.status_code == 404:
        assert response.json()["error"] == "not_found", response.text
        return None
    assert response.status_code == 200, response.text
    assert response.json()["id"] == command_id
    status: str = response.json()["status"]
    return status


async def _confirmed_total(api: Api) -> float:
    text = (await api.client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(CONFIRMED_TOTAL + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{CONFIRMED_TOTAL} not in /metrics")


def _answer(response_json: dict[str, str], command_id: str, code: int) -> str:
    if code == 200:
        assert response_json["id"] == command_id
        return response_json["status"]
    assert response_json["detail"], response_json
    return response_json["error"]


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.make.__name__)
@pytest.mark.parametrize("action", ["confirm", "cancel"])
async def test_each_row_of_the_status_table_over_http(api: Api, row: Row, action: str) -> None:
    command_id = await row.make(api, "dev-1")
    expected_code, expected = row.confirm if action == "confirm" else row.cancel
    assert await _status(api, command_id) == row.status
    counted_before = await _confirmed_total(api)

    response = await api.client.post(f"/commands/{command_id}/{action}")

    assert (response.status_code, _answer(response.json(), command_id, response.status_code)) == (
        expected_code,
        expected,
    ), response.text
    after = await _status(api, command_id)
    if expected_code == 200:
        assert after == expected
    else:
        assert after == row.status, "a refused action changed the command"
    counted = await _confirmed_total(api) - counted_before
    assert counted == (1 if action == "confirm" and row.confirm_counts else 0)


async def test_confirming_twice_counts_once_and_delivers_once(api: Api) -> None:
    command_id = await awaiting(api, "dev-1")

    answers = [(await api.client.post(f"/commands/{command_id}/confirm")).json() for _ in "12"]

    assert answers == [{"id": command_id, "status": "pending"}] * 2
    assert await _confirmed_total(api) == 1
    assert await api.backends.store.drain_pending("dev-1") == [b"reboot"]
    assert await api.backends.store.drain_pending("dev-1") == []


@asynccontextmanager
async def _on_postgres(tmp_path: Path) -> AsyncIterator[Api]:
    async with (
        postgres_schema() as schema,
        running(tmp_path, state_url=f"{POSTGRES_URL}?schema={schema}") as api,
    ):
        yield api


@asynccontextmanager
async def _on_redis(tmp_path: Path) -> AsyncIterator[Api]:
    async with (
        redis_prefix() as prefix,
        running(tmp_path, state_url=f"{REDIS_URL}?prefix={prefix}") as api,
    ):
        yield api


@pytest.mark.parametrize(
    "backend", [running, _on_postgres, _on_redis], ids=["sqlite", "postgresql", "redis"]
)
async def test_concurrent_confirms_count_once_on_every_state_backend(
    tmp_path: Path, backend: Callable[[Path], AbstractAsyncContextManager[Api]]
) -> None:
    async with backend(tmp_path) as api:
        command_id = await awaiting(api, "dev-1")

        answers = await asyncio.gather(
            *(api.client.post(f"/commands/{command_id}/confirm") for _ in range(8))
        )

        assert {(r.status_code, r.json()["status"]) for r in answers} == {(200, "pending")}
        assert await _confirmed_total(api) == 1
        assert await api.backends.store.drain_pending("dev-1") == [b"reboot"]
