"""The fleet endpoints over real HTTP, against the real broker and SQLite state: outcome
reports (rule 9), rollouts (rule 10), the per-device limit (rule 11) and retiring a device."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from amqp_queue.config import RabbitMQConfig
from amqp_queue.state.validation import Limits
from tests.api_support import Api, running
from tests.rabbitmq_support import AMQP_URL
from tests.support import FakeClock, unique

UNKNOWN = "00000000-0000-0000-0000-000000000001"


@pytest.fixture
async def api(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Api]:
    config = RabbitMQConfig(exchange=unique("test.api."), limits=Limits(max_pending_per_device=3))
    async with running(tmp_path, clock=clock, rabbitmq=config) as opened:
        yield opened


async def _delivered(api: Api, device: str = "dev-1", **body: object) -> str:
    command_id: str = (await api.enqueue(device, **body)).json()["id"]
    assert await api.backends.store.drain_pending(device) != []
    return command_id


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "amqp_queue.api.audit"]


async def test_a_reported_success_is_kept_with_its_result_and_shown_by_the_command(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    command_id = await _delivered(api)
    raw = b"\x00\xffdone"
    report = {"outcome": "succeeded", "result": base64.b64encode(raw).decode()}
    report["encoding"] = "base64"

    response = await api.client.post(f"/commands/{command_id}/outcome", json=report)
    again = await api.client.post(f"/commands/{command_id}/outcome", json=report)
    shown = (await api.client.get(f"/commands/{command_id}")).json()

    assert response.status_code == 200
    assert again.status_code == 200  # the same report twice is harmless
    assert shown["status"] == "succeeded"
    assert shown["outcome"]["status"] == "succeeded"
    assert base64.b64decode(shown["outcome"]["result"]) == raw
    assert shown["outcome"]["encoding"] == "base64"
    assert "reported_at" in shown["outcome"]
    outcome = await api.backends.store.get_outcome(command_id)
    assert outcome is not None
    assert outcome.result == raw
    assert (
        f"operator alice reported the outcome of command {command_id}: ok, succeeded"
        in _audit_lines(caplog)
    )


async def test_a_reported_failure_keeps_its_reason_and_another_outcome_is_a_409(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    command_id = await _delivered(api)

    failed = await api.client.post(
        f"/commands/{command_id}/outcome", json={"outcome": "failed", "reason": "door jammed"}
    )
    other = await api.client.post(f"/commands/{command_id}/outcome", json={"outcome": "succeeded"})

    assert failed.status_code == 200
    assert failed.json()["outcome"] == {
        "status": "failed",
        "reason": "door jammed",
        "reported_at": failed.json()["outcome"]["reported_at"],
    }
    assert (other.status_code, other.json()["error"]) == (409, "outcome_rejected")
    assert f"command {command_id}: outcome_rejected" in _audit_lines(caplog)[-1]
    assert (await api.client.get(f"/commands/{command_id}")).json()["status"] == "failed"


async def test_an_outcome_for_an_undelivered_command_is_a_409_and_changes_nothing(
    api: Api,
) -> None:
    command_id = (await api.enqueue("dev-1")).json()["id"]

    response = await api.client.post(
        f"/commands/{command_id}/outcome", json={"outcome": "succeeded"}
    )

    assert (response.status_code, response.json()["error"]) == (409, "outcome_rejected")
    assert "not delivered" in response.json()["detail"]
    record = (await api.client.get(f"/commands/{command_id}")).json()
    assert (record["id"], record["status"]) == (command_id, "pending")
    assert "outcome" not in record


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"outcome": "maybe"},
        {"outcome": "failed"},
        {"outcome": "failed", "reason": "x", "result": "y"},
        {"outcome": "succeeded", "reason": "x"},
        {"outcome": "succeeded", "result": "%%", "encoding": "base64"},
        {"outcome": "failed", "reason": "r" * 1025},
        {"outcome": "succeeded", "extra": 1},
    ],
)
async def test_a_bad_outcome_report_is_a_400_and_records_nothing(
    api: Api, report: dict[str, object]
) -> None:
    command_id = await _delivered(api)

    response = await api.client.post(f"/commands/{command_id}/outcome", json=report)

    assert (response.status_code, response.json()["error"]) == (400, "invalid_input")
    assert await api.backends.store.get_outcome(command_id) is None


async def test_an_outcome_for_an_unknown_command_is_a_404(api: Api) -> None:
    response = await api.client.post(f"/commands/{UNKNOWN}/outcome", json={"outcome": "succeeded"})

    assert (response.status_code, response.json()["error"]) == (404, "not_found")


async def test_an_outcome_timeout_given_at_enqueue_ends_the_command_timed_out(
    api: Api, clock: FakeClock
) -> None:
    command_id = await _delivered(api, outcome_timeout=30)

    clock.advance(31)
    await api.client.post("/cleanup")
    shown = (await api.client.get(f"/commands/{command_id}")).json()

    assert shown["status"] == "timed_out"
    assert shown["outcome"]["status"] == "timed_out"
    text = (await api.client.get("/metrics")).text
    assert 'amqp_queue_commands_outcomes_total{outcome="timed_out"} 1.0' in text


async def test_a_bad_outcome_timeout_is_a_400_and_writes_nothing(api: Api) -> None:
    for bad in ("soon", -1, True):
        response = await api.enqueue("dev-1", outcome_timeout=bad)

        assert (response.status_code, response.json()["error"]) == (400, "invalid_input"), bad
    assert (await api.client.get("/devices/dev-1/commands")).json()["commands"] == []


async def test_a_rollout_is_created_summarised_confirmed_and_cancelled_as_a_whole(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    devices = ["dev-1", "dev-2", "dev-3"]
    created = await api.client.post(
        "/rollouts",
        json={
            "device_ids": devices,
            "payload": "firmware 2.1",
            "ttl": 600,
            "command_type": "firmware",
            "requires_confirmation": True,
        },
    )
    rollout_id = created.json()["rollout_id"]
    command_ids = created.json()["command_ids"]

    assert created.status_code == 201
    assert created.headers["Location"] == f"/rollouts/{rollout_id}"
    assert len(command_ids) == 3
    awaiting = (await api.client.get(f"/rollouts/{rollout_id}")).json()
    assert awaiting["total"] == 3
    assert awaiting["counts"]["awaiting_confirmation"] == 3
    assert set(awaiting["counts"]) >= {"pending", "delivered", "succeeded", "failed", "timed_out"}

    confirmed = await api.client.post(f"/rollouts/{rollout_id}/confirm")
    assert confirmed.json() == {"rollout_id": rollout_id, "confirmed": 3}
    assert (await api.backends.store.drain_pending("dev-1")) == [b"firmware 2.1"]

    cancelled = await api.client.post(f"/rollouts/{rollout_id}/cancel")
    assert cancelled.json() == {"rollout_id": rollout_id, "cancelled": 2}
    # The index keeps who did it, as for single commands.
    first = (await api.client.get(f"/commands/{command_ids[0]}")).json()
    last = (await api.client.get(f"/commands/{command_ids[2]}")).json()
    assert (first["enqueued_by"], first["confirmed_by"], first["cancelled_by"]) == (
        "alice",
        "alice",
        None,
    )
    assert last["cancelled_by"] == "alice"
    counts = (await api.client.get(f"/rollouts/{rollout_id}")).json()["counts"]
    assert (counts["delivered"], counts["cancelled"], counts["pending"]) == (1, 2, 0)
    lines = _audit_lines(caplog)
    assert any(
        line.startswith("operator alice create rollout for 3 devices: ok, rollout " + rollout_id)
        for line in lines
    )
    assert f"operator alice confirm rollout {rollout_id}: ok, 3 confirmed" in lines
    assert f"operator alice cancel rollout {rollout_id}: ok, 2 cancelled" in lines


@pytest.mark.parametrize("action", ["", "/confirm", "/cancel"])
async def test_an_unknown_rollout_is_a_404(api: Api, action: str) -> None:
    method = "GET" if not action else "POST"
    for rollout_id in (UNKNOWN, "not-a-uuid", "0%2F"):
        response = await api.client.request(method, f"/rollouts/{rollout_id}{action}")

        assert response.status_code == 404, rollout_id
        assert response.json()["error"] == "rollout_not_found", rollout_id


@pytest.mark.parametrize(
    "body",
    [
        {"device_ids": "dev-1"},
        {"device_ids": []},
        {"device_ids": ["dev-1", "bad id"]},
        {"device_ids": ["dev-1", "dev-1"]},
        {"device_ids": ["dev-1"], "requires_confirmation": True},
        {"device_ids": ["dev-1"], "requires_confirmation": "yes", "command_type": "fw"},
        {"device_ids": ["dev-1"], "ttl": "long"},
        {"device_ids": ["dev-1"], "mode": "plain"},
    ],
)
async def test_a_bad_rollout_is_a_400_and_writes_nothing(api: Api, body: dict[str, object]) -> None:
    response = await api.client.post("/rollouts", json={"payload": "x", "ttl": 60, **body})

    assert (response.status_code, response.json()["error"]) == (400, "invalid_input")
    assert await api.backends.store.get_pending("dev-1") == []


async def test_an_enqueue_over_the_device_limit_is_a_429_naming_the_limit(api: Api) -> None:
    for _ in range(3):
        assert (await api.enqueue("dev-1")).status_code == 201

    refused = await api.enqueue("dev-1")
    rollout = await api.client.post(
        "/rollouts", json={"device_ids": ["dev-2", "dev-1"], "payload": "x", "ttl": 60}
    )

    assert (refused.status_code, refused.json()["error"]) == (429, "queue_full")
    assert "limit of 3" in refused.json()["detail"]
    assert (rollout.status_code, rollout.json()["error"]) == (429, "queue_full")
    assert len(await api.backends.store.get_pending("dev-1")) == 3
    assert await api.backends.store.get_pending("dev-2") == []  # all or nothing


async def test_retiring_a_device_cancels_its_open_commands_and_deletes_its_queue(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    first = (await api.enqueue("dev-2")).json()["id"]
    second = (await api.enqueue("dev-2", mode="confirm", command_type="unlock")).json()["id"]

    response = await api.client.post("/devices/dev-2/retire")

    assert response.json() == {"device_id": "dev-2", "cancelled": 2}
    for command_id in (first, second):
        shown = await api.client.get(f"/commands/{command_id}")
        assert shown.json()["status"] == "cancelled"
    name = api.backends.store.config.queue_name("dev-2")
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(name, passive=True)
    assert (
        "operator alice retire device dev-2: ok, 2 open commands cancelled, queue deleted"
        in _audit_lines(caplog)
    )
    bad = await api.client.post("/devices/amq.x/retire")
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_input")


async def test_outcomes_are_counted_on_metrics(api: Api) -> None:
    succeeded = await _delivered(api)
    failed = await _delivered(api)
    await api.client.post(f"/commands/{succeeded}/outcome", json={"outcome": "succeeded"})
    await api.client.post(f"/commands/{failed}/outcome", json={"outcome": "failed", "reason": "x"})

    text = (await api.client.get("/metrics")).text

    assert 'amqp_queue_commands_outcomes_total{outcome="succeeded"} 1.0' in text
    assert 'amqp_queue_commands_outcomes_total{outcome="failed"} 1.0' in text
