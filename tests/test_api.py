"""The operator HTTP API over a real socket, against the real broker and SQLite state."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import httpx
import pytest
from starlette.routing import Route

from amqp_queue import (
    BrokerError,
    CommandExpired,
    CommandNotFound,
    CommandStatus,
    QueueError,
    StateError,
)
from amqp_queue.api import error_status
from amqp_queue.state.errors import ClaimOutcomeUnknown
from tests.api_support import OTHER_TOKEN, TOKEN, Api, running
from tests.rabbitmq_support import AMQP_URL
from tests.support import FakeClock

PROTECTED = [
    ("POST", "/devices/dev-1/commands"),
    ("GET", "/devices/dev-1/commands"),
    ("GET", "/devices/dev-1/confirmations"),
    ("GET", "/commands/00000000-0000-0000-0000-000000000001"),
    ("POST", "/commands/00000000-0000-0000-0000-000000000001/confirm"),
    ("POST", "/commands/00000000-0000-0000-0000-000000000001/cancel"),
    ("POST", "/cleanup"),
    ("GET", "/whoami"),
    ("POST", "/commands/00000000-0000-0000-0000-000000000001/outcome"),
    ("POST", "/rollouts"),
    ("GET", "/rollouts/00000000-0000-0000-0000-000000000001"),
    ("POST", "/rollouts/00000000-0000-0000-0000-000000000001/confirm"),
    ("POST", "/rollouts/00000000-0000-0000-0000-000000000001/cancel"),
    ("POST", "/devices/dev-1/retire"),
]


@pytest.fixture
async def api(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Api]:
    async with running(tmp_path, clock=clock) as opened:
        yield opened


async def test_every_operator_endpoint_refuses_a_missing_or_wrong_token(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        for method, path in PROTECTED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                body = {"payload": "x", "ttl": 60}
                response = await anonymous.request(method, path, json=body, headers=headers)

                assert response.status_code == 401, (method, path, headers)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert response.json()["error"] == "unauthorized"

    assert await api.backends.store.get_pending("dev-1") == []


async def test_every_configured_token_is_accepted(api: Api) -> None:
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}

    response = await api.client.get("/devices/dev-1/commands", headers=other)

    assert response.status_code == 200


async def test_tokens_never_reach_the_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    enqueued = (await api.enqueue("dev-1", mode="confirm", command_type="unlock")).json()
    await api.client.post(f"/commands/{enqueued['id']}/confirm")
    await api.client.get("/devices/dev-1/commands", headers={"Authorization": "Bearer guess"})

    assert TOKEN not in caplog.text
    assert "guess" not in caplog.text


async def test_enqueue_then_list_and_get_status(api: Api) -> None:
    response = await api.enqueue("dev-1", payload="reboot", ttl=60)

    assert response.status_code == 201
    command_id = response.json()["id"]
    assert response.json()["status"] == "pending"
    assert response.headers["Location"] == f"/commands/{command_id}"
    listing = (await api.client.get("/devices/dev-1/commands")).json()
    assert [(c["id"], c["payload"], c["encoding"]) for c in listing["commands"]] == [
        (command_id, "reboot", "utf-8")
    ]
    status = (await api.client.get(f"/commands/{command_id}")).json()
    # The whole record since issue 15; id and status as before.
    assert (status["id"], status["status"]) == (command_id, "pending")


async def test_a_base64_payload_arrives_as_the_same_bytes(api: Api) -> None:
    raw = bytes(range(256))

    response = await api.enqueue("dev-1", payload=base64.b64encode(raw).decode(), encoding="base64")

    assert response.status_code == 201
    assert await api.backends.store.drain_pending("dev-1") == [raw]


async def test_latest_mode_replaces_the_undelivered_command_of_its_type(api: Api) -> None:
    first = (await api.enqueue("dev-1", payload="20", mode="latest", command_type="sp")).json()
    second = (await api.enqueue("dev-1", payload="21", mode="latest", command_type="sp")).json()

    assert (await api.client.get(f"/commands/{first['id']}")).json()["status"] == "superseded"
    assert await api.backends.store.drain_pending("dev-1") == [b"21"]
    assert (await api.client.get(f"/commands/{second['id']}")).json()["status"] == "delivered"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"payload": "x"}, "ttl is required"),
        ({"payload": "x", "ttl": -1}, "ttl must be positive"),
        ({"payload": "x", "ttl": "60"}, "number of seconds"),
        ({"payload": "x", "ttl": True}, "number of seconds"),
        ({"ttl": 60}, "payload is required"),
        ({"payload": 5, "ttl": 60}, "payload must be a string"),
        ({"payload": "%%%", "ttl": 60, "encoding": "base64"}, "not valid base64"),
        ({"payload": "x", "ttl": 60, "encoding": "latin-1"}, "encoding must be one of"),
        ({"payload": "x", "ttl": 60, "mode": "urgent"}, "mode must be one of"),
        ({"payload": "x", "ttl": 60, "mode": "latest"}, "needs a command type"),
        ({"payload": "x", "ttl": 60, "command_type": "sp"}, "plain command has no command type"),
        ({"payload": "x", "ttl": 60, "mode": "confirm", "command_type": "a b"}, "command type"),
        ({"payload": "x", "ttl": 60, "ttl_seconds": 5}, "unknown field(s) ttl_seconds"),
        ({"payload": "x" * 300_000, "ttl": 60}, "over the limit"),
    ],
)
async def test_bad_enqueue_input_is_a_400_that_says_what_is_wrong_and_writes_nothing(
    tmp_path: Path, body: dict[str, object], expected: str
) -> None:
    async with running(tmp_path, max_body_bytes=512 * 1024) as api:
        response = await api.client.post("/devices/dev-1/commands", json=body)

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_input"
        assert expected in response.json()["detail"]
        assert await api.backends.store.get_pending("dev-1") == []


async def test_a_bad_device_id_is_a_400(api: Api) -> None:
    response = await api.enqueue("amq.reserved")

    assert response.status_code == 400
    assert "amq." in response.json()["detail"]
    assert (await api.client.get("/devices/bad*id/commands")).status_code == 400


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\xfa", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"payload": "x", "ttl": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ],
)
async def test_a_malformed_body_is_a_400_never_a_500(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    async with running(tmp_path, max_body_bytes=512 * 1024) as api:
        response = await api.client.post("/devices/dev-1/commands", content=content)

        assert response.status_code == 400
        assert expected in response.json()["detail"]


async def test_an_oversized_body_is_a_413_declared_or_streamed(api: Api) -> None:
    big = b'{"payload": "' + b"x" * 70_000 + b'", "ttl": 60}'

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    declared = await api.client.post("/devices/dev-1/commands", content=big)
    streamed = await api.client.post("/devices/dev-1/commands", content=chunks())

    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "transfer-encoding" not in declared.request.headers
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert await api.backends.store.get_pending("dev-1") == []


@pytest.mark.parametrize(
    ("method", "action"),
    [("GET", ""), ("POST", "/confirm"), ("POST", "/cancel")],
)
async def test_an_unknown_command_id_is_a_404(api: Api, method: str, action: str) -> None:
    for command_id in ("00000000-0000-0000-0000-000000000042", "not-a-uuid"):
        response = await api.client.request(method, f"/commands/{command_id}{action}")

        assert response.status_code == 404
        assert response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/commands/0%2F", 404, "not_found"),
        ("GET", "/commands/0%2f/", 404, "not_found"),
        ("POST", "/commands/a%2Fb/confirm", 404, "not_found"),
        ("POST", "/commands/a%2Fb/cancel", 404, "not_found"),
        ("POST", "/devices/gw%2F7/commands", 400, "invalid_input"),
        ("GET", "/devices/gw%2F7/commands", 400, "invalid_input"),
        ("GET", "/devices/gw%2F7/confirmations", 400, "invalid_input"),
    ],
)
async def test_an_encoded_slash_in_a_path_parameter_is_a_clear_4xx_never_a_redirect(
    api: Api, method: str, path: str, status: int, error: str
) -> None:
    """Decoded, %2F makes an extra path segment: no redirect, no bare 404, but the reason.
    A command id that is no UUID is unknown (404); a device id with '/' is bad input (400)."""
    response = await api.client.request(method, path, json={"payload": "x", "ttl": 60})

    assert (response.status_code, response.json()["error"]) == (status, error), response.text
    assert "UUID" in response.json()["detail"] or "'/'" in response.json()["detail"]


async def test_confirming_or_cancelling_an_expired_command_is_a_410(
    api: Api, clock: FakeClock
) -> None:
    waiting = await api.enqueue("dev-1", ttl=30, mode="confirm", command_type="unlock")
    plain = await api.enqueue("dev-2", ttl=30)
    clock.advance(30)

    confirmed = await api.client.post(f"/commands/{waiting.json()['id']}/confirm")
    cancelled = await api.client.post(f"/commands/{plain.json()['id']}/cancel")

    assert (confirmed.status_code, confirmed.json()["error"]) == (410, "expired")
    assert (cancelled.status_code, cancelled.json()["error"]) == (410, "expired")


async def test_a_confirmed_command_is_consumed_and_the_confirmation_is_audited(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    command_id = (
        await api.enqueue("dev-1", payload="door", mode="confirm", command_type="unlock")
    ).json()["id"]
    waiting = (await api.client.get("/devices/dev-1/confirmations")).json()["commands"]
    assert [c["id"] for c in waiting] == [command_id]
    assert await api.backends.store.drain_pending("dev-1") == []

    response = await api.client.post(f"/commands/{command_id}/confirm")

    assert response.json() == {"id": command_id, "status": "pending"}
    async with api.backends.store.consume("dev-1") as stream:
        async with asyncio.timeout(10):
            command = await anext(stream)
    assert (command.id, command.payload) == (command_id, b"door")
    assert await api.backends.store.get_status(command_id) == CommandStatus.DELIVERED
    assert f"operator alice confirm command {command_id}: ok" in caplog.text


async def test_the_audit_line_of_a_confirm_that_changed_nothing_says_so(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    plain = (await api.enqueue("dev-1")).json()["id"]
    unlock = (await api.enqueue("dev-1", mode="confirm", command_type="unlock")).json()["id"]

    for command_id in (plain, unlock, unlock):
        response = await api.client.post(f"/commands/{command_id}/confirm")
        assert response.json() == {"id": command_id, "status": "pending"}

    nothing = "ok, nothing changed (no confirmation needed)"
    lines = [r.getMessage() for r in caplog.records if r.name == "amqp_queue.api.audit"]
    assert lines[-3:] == [
        f"operator alice confirm command {plain}: {nothing}",
        f"operator alice confirm command {unlock}: ok",
        f"operator alice confirm command {unlock}: {nothing}",
    ]


async def test_cancel_is_audited_and_a_second_cancel_is_a_404(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    command_id = (await api.enqueue("dev-1")).json()["id"]

    first = await api.client.post(f"/commands/{command_id}/cancel")
    second = await api.client.post(f"/commands/{command_id}/cancel")

    assert first.json() == {"id": command_id, "status": "cancelled"}
    assert second.status_code == 404
    assert await api.backends.store.drain_pending("dev-1") == []
    assert f"operator alice cancel command {command_id}: ok" in caplog.text
    assert f"operator alice cancel command {command_id}: not_found" in caplog.text


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_count_what_happens_to_commands(api: Api, clock: FakeClock) -> None:
    await api.enqueue("dev-1", mode="latest", command_type="sp", payload="1")
    await api.enqueue("dev-1", mode="latest", command_type="sp", payload="2")
    cancelled = (await api.enqueue("dev-2")).json()["id"]
    await api.client.post(f"/commands/{cancelled}/cancel")
    await api.enqueue("dev-3", ttl=30)
    await api.backends.store.drain_pending("dev-1")
    clock.advance(30)  # the others live for 60 s
    assert (await api.client.post("/cleanup")).json() == {"expired": 1}

    response = await api.client.get("/metrics", headers={"Authorization": ""})
    text = response.text

    assert response.headers["content-type"].startswith("text/plain")
    assert _sample(text, 'amqp_queue_commands_enqueued_total{mode="latest"}') == 2
    assert _sample(text, 'amqp_queue_commands_enqueued_total{mode="plain"}') == 2
    assert _sample(text, "amqp_queue_commands_superseded_total") == 1
    assert _sample(text, "amqp_queue_commands_cancelled_total") == 1
    assert _sample(text, "amqp_queue_commands_expired_total") == 1
    assert _sample(text, "amqp_queue_commands_delivered_total") == 1
    assert _sample(text, "amqp_queue_commands_published_total") >= 3
    assert _sample(text, "amqp_queue_commands_pending") == 0
    assert _sample(text, "amqp_queue_publish_latency_seconds_count") >= 3
    assert _sample(text, "amqp_queue_delivery_latency_seconds_count") == 1


async def test_healthz_reports_broker_and_state_without_a_token(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        response = await anonymous.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "broker": "ok", "state": "ok"}


async def test_healthz_is_503_when_the_broker_connection_is_gone(api: Api) -> None:
    await api.backends.connection.close()

    response = await api.client.get("/healthz")

    assert response.status_code == 503
    assert response.json()["broker"].startswith("unreachable")
    assert response.json()["state"] == "ok"


async def test_openapi_documents_every_route_with_its_methods(api: Api) -> None:
    document = (await api.client.get("/openapi.json", headers={"Authorization": ""})).json()
    app = api.backends.api().app()

    routed: dict[str, set[str]] = {}
    for route in app.routes:
        assert isinstance(route, Route)
        methods = (route.methods or set()) - {"HEAD"}
        routed.setdefault(route.path, set()).update(m.lower() for m in methods)
    documented = {path: set(item) for path, item in document["paths"].items()}
    assert documented == routed


async def test_unknown_paths_and_methods_answer_in_json(api: Api) -> None:
    missing = await api.client.get("/nowhere")
    wrong = await api.client.delete("/cleanup")

    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["error"]) == (405, "method_not_allowed")


async def test_an_enqueue_meeting_a_queue_of_another_type_is_a_409_naming_it(api: Api) -> None:
    name = api.backends.store.config.queue_name("dev-3")
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})

    response = await api.enqueue("dev-3")

    assert (response.status_code, response.json()["error"]) == (409, "queue_mismatch")
    assert "x-queue-type" in response.json()["detail"]
    # Declared before the write: nothing is written (docs/service.md says so).
    listed = await api.client.get("/devices/dev-3/commands")
    assert listed.json()["commands"] == []


def _all_subclasses(kind: type[QueueError]) -> list[type[QueueError]]:
    return [kind, *(sub for direct in kind.__subclasses__() for sub in _all_subclasses(direct))]


SERVICE_UNAVAILABLE = (StateError, ClaimOutcomeUnknown, BrokerError)


def test_every_error_of_the_tree_has_an_http_status_other_than_500() -> None:
    for kind in _all_subclasses(QueueError):
        if kind is QueueError:
            continue
        error = (
            kind("00000000-0000-0000-0000-000000000000")
            if issubclass(kind, CommandNotFound)
            else kind("x")
        )

        # The backends' own failures are a 503 (ClaimOutcomeUnknown: the index could not
        # tell whether a drain's claim landed), never a bare 500.
        assert error_status(error)[0] < 500 or kind in SERVICE_UNAVAILABLE, kind
    assert error_status(CommandExpired("x")) == (410, "expired")
    assert error_status(StateError("x")) == (503, "state_unavailable")
