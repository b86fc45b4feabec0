"""The console's API over real HTTP: the fleet-wide inbox, the devices, a device's history,
a command's whole record, who did what, and the four-eyes rule."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from amqp_queue.auth import Tokens
from tests.api_support import Api, running
from tests.support import FakeClock

TOKENS = Tokens.parse(
    "ann:ann-token-0001:approver,ben:ben-token-0002:approver,vic:vic-tok-3:viewer"
)
AS_ANN = {"Authorization": "Bearer ann-token-0001"}
AS_BEN = {"Authorization": "Bearer ben-token-0002"}
AS_VIC = {"Authorization": "Bearer vic-tok-3"}


@pytest.fixture
async def api(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Api]:
    async with running(tmp_path, clock=clock, tokens=TOKENS, four_eyes=True) as opened:
        opened.client.headers.update(AS_ANN)
        yield opened


async def _confirmable(api: Api, device: str, kind: str, payload: str = "open") -> str:
    response = await api.enqueue(device, mode="confirm", command_type=kind, payload=payload)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_the_inbox_lists_the_fleet_oldest_first_with_who_and_time_left(
    api: Api, clock: FakeClock
) -> None:
    first = await _confirmable(api, "dev-1", "unlock", "x" * 100)
    clock.advance(5)
    second = await _confirmable(api, "dev-2", "firmware")
    clock.advance(5)
    third = await _confirmable(api, "gate-3", "unlock")
    await api.enqueue("dev-1", payload="plain")

    answer = (await api.client.get("/confirmations", headers=AS_VIC)).json()
    assert [entry["id"] for entry in answer["commands"]] == [first, second, third]
    assert answer["next"] is None
    entry = answer["commands"][0]
    assert entry["device_id"] == "dev-1"
    assert entry["command_type"] == "unlock"
    assert entry["enqueued_by"] == "ann"
    assert entry["payload_preview"] == "x" * 64
    assert entry["payload_bytes"] == 100
    assert entry["age_seconds"] == 10
    assert entry["time_left_seconds"] == 50

    page = (await api.client.get("/confirmations", params={"limit": 2})).json()
    assert [entry["id"] for entry in page["commands"]] == [first, second]
    rest = (await api.client.get("/confirmations", params={"after": page["next"]})).json()
    assert [entry["id"] for entry in rest["commands"]] == [third]

    by_prefix = await api.client.get("/confirmations", params={"device_prefix": "dev-"})
    assert [entry["id"] for entry in by_prefix.json()["commands"]] == [first, second]
    by_type = await api.client.get("/confirmations", params={"command_type": "unlock"})
    assert [entry["id"] for entry in by_type.json()["commands"]] == [first, third]

    for bad in ({"after": "not-a-cursor"}, {"limit": "0"}, {"limit": "501"}, {"limit": "x"}):
        response = await api.client.get("/confirmations", params=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"] == "invalid_input"


async def test_devices_are_listed_with_counts_in_pages(api: Api) -> None:
    await api.enqueue("dev-2")
    await _confirmable(api, "dev-2", "unlock")
    await api.enqueue("dev-1")
    answer = (await api.client.get("/devices", headers=AS_VIC)).json()
    assert answer == {
        "devices": [
            {"device_id": "dev-1", "open": 1, "counts": {"pending": 1, "awaiting_confirmation": 0}},
            {"device_id": "dev-2", "open": 2, "counts": {"pending": 1, "awaiting_confirmation": 1}},
        ],
        "next": None,
    }
    page = (await api.client.get("/devices", params={"limit": 1})).json()
    assert [d["device_id"] for d in page["devices"]] == ["dev-1"]
    rest = (await api.client.get("/devices", params={"after": page["next"]})).json()
    assert [d["device_id"] for d in rest["devices"]] == ["dev-2"]


async def test_history_and_the_whole_record_say_who_did_what_and_when(
    api: Api, clock: FakeClock
) -> None:
    approved = await _confirmable(api, "dev-1", "unlock")
    clock.advance(1)
    cancelled = await _confirmable(api, "dev-1", "light")
    assert (await api.client.post(f"/commands/{approved}/confirm", headers=AS_BEN)).is_success
    assert (await api.client.post(f"/commands/{cancelled}/cancel", headers=AS_BEN)).is_success

    record = (await api.client.get(f"/commands/{approved}", headers=AS_VIC)).json()
    assert record["id"] == approved
    assert record["status"] == "pending"
    assert (record["enqueued_by"], record["confirmed_by"], record["cancelled_by"]) == (
        "ann",
        "ben",
        None,
    )
    assert (record["payload"], record["encoding"]) == ("open", "utf-8")
    assert record["confirmed_at"] is not None
    assert record["delivered_at"] is None

    history = (await api.client.get("/devices/dev-1/history")).json()
    assert [(c["id"], c["status"]) for c in history["commands"]] == [
        (cancelled, "cancelled"),
        (approved, "pending"),
    ]
    assert history["commands"][0]["cancelled_by"] == "ben"
    assert history["commands"][0]["ended_at"] is not None
    assert history["next"] is None


async def test_four_eyes_refuses_a_self_approval_changes_nothing_and_audits_it(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    command_id = await _confirmable(api, "dev-1", "unlock")

    refused = await api.client.post(f"/commands/{command_id}/confirm")
    assert refused.status_code == 403
    assert refused.json()["error"] == "four_eyes"
    assert "ann" in refused.json()["detail"]
    status = (await api.client.get(f"/commands/{command_id}")).json()
    assert (status["status"], status["confirmed_by"]) == ("awaiting_confirmation", None)
    assert f"operator ann confirm command {command_id}: four_eyes" in caplog.text

    approved = await api.client.post(f"/commands/{command_id}/confirm", headers=AS_BEN)
    assert approved.status_code == 200
    assert approved.json()["status"] == "pending"
    # Confirming again changes nothing: harmless, even for its enqueuer.
    again = await api.client.post(f"/commands/{command_id}/confirm")
    assert again.status_code == 200


async def test_four_eyes_refuses_a_rollout_confirmed_by_its_creator(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    created = await api.client.post(
        "/rollouts",
        json={
            "device_ids": ["dev-1", "dev-2"],
            "payload": "firmware 2",
            "ttl": 600,
            "command_type": "firmware",
            "requires_confirmation": True,
        },
    )
    assert created.status_code == 201, created.text
    rollout = created.json()["rollout_id"]

    refused = await api.client.post(f"/rollouts/{rollout}/confirm")
    assert refused.status_code == 403
    assert refused.json()["error"] == "four_eyes"
    assert "rollout" in refused.json()["detail"]
    summary = (await api.client.get(f"/rollouts/{rollout}")).json()
    assert summary["counts"]["awaiting_confirmation"] == 2
    assert f"operator ann confirm rollout {rollout}: four_eyes" in caplog.text

    approved = await api.client.post(f"/rollouts/{rollout}/confirm", headers=AS_BEN)
    assert (approved.status_code, approved.json()["confirmed"]) == (200, 2)
    # Nothing awaits any more: confirming again is harmless, even for its creator.
    again = await api.client.post(f"/rollouts/{rollout}/confirm")
    assert (again.status_code, again.json()["confirmed"]) == (200, 0)


async def test_without_four_eyes_the_enqueuer_may_confirm(tmp_path: Path) -> None:
    async with running(tmp_path, tokens=TOKENS) as api:
        api.client.headers.update(AS_ANN)
        command_id = await _confirmable(api, "dev-1", "unlock")
        response = await api.client.post(f"/commands/{command_id}/confirm")
        assert response.status_code == 200
        record = (await api.client.get(f"/commands/{command_id}")).json()
        assert (record["enqueued_by"], record["confirmed_by"]) == ("ann", "ann")


async def test_the_new_routes_are_in_the_openapi_document(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anyone:
        document = (await anyone.get("/openapi.json")).json()
    for path in ("/confirmations", "/devices", "/devices/{device_id}/history"):
        assert "get" in document["paths"][path]
    record = document["components"]["schemas"]["CommandRecord"]["properties"]
    assert {"enqueued_by", "confirmed_by", "cancelled_by", "delivered_at"} <= set(record)
