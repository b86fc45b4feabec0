"""Token roles over real HTTP: each route's right, the 403 and its audit line, the console's
files served without a token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from amqp_queue import CommandStatus
from amqp_queue.api import PROTECTED
from amqp_queue.auth import Right, Role, Tokens
from tests.api_support import TOKEN, Api, running
from tests.support import FakeClock

VIEWER, OPERATOR, APPROVER = "viewer-token-123", "operator-token-456", "approver-token-789"
ROLE_TOKENS = Tokens.parse(
    f"alice:{TOKEN},val:{VIEWER}:viewer,otto:{OPERATOR}:operator,ada:{APPROVER}:approver"
)
AS = {
    role: {"Authorization": f"Bearer {token}"}
    for role, token in (
        (Role.VIEWER, VIEWER),
        (Role.OPERATOR, OPERATOR),
        (Role.APPROVER, APPROVER),
        (Role.FULL, TOKEN),
    )
}
NEEDS = {Right.READ: Role.VIEWER, Right.OPERATE: Role.OPERATOR, Right.CONFIRM: Role.APPROVER}
"""The least role holding each right."""
ORDER = [Role.VIEWER, Role.OPERATOR, Role.APPROVER, Role.FULL]


@pytest.fixture
async def api(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Api]:
    async with running(tmp_path, clock=clock, tokens=ROLE_TOKENS) as opened:
        yield opened


def _concrete(path: str) -> str:
    unknown = "00000000-0000-0000-0000-000000000001"
    return (
        path.replace("{device_id}", "dev-1")
        .replace("{command_id}", unknown)
        .replace("{rollout_id}", unknown)
    )


async def test_every_route_answers_403_to_a_role_below_its_right_and_lets_the_others_in(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="amqp_queue.api.audit")
    for path, method, _, right in PROTECTED:
        least = ORDER.index(NEEDS[right])
        for role in ORDER:
            response = await api.client.request(
                method, _concrete(path), json={"payload": "x", "ttl": 60}, headers=AS[role]
            )
            if ORDER.index(role) < least:
                assert response.status_code == 403, (method, path, role)
                assert response.json()["error"] == "forbidden"
                assert f"which may not {right.value}" in response.json()["detail"]
            else:
                # Let in: whatever the call answers, it is not a refusal of the role.
                assert response.status_code not in (401, 403), (method, path, role)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # viewer: 9 operate/confirm routes; operator: the 2 confirm routes.
    assert len(refusals) == 11
    assert (
        "operator val refused: POST /commands/00000000-0000-0000-0000-000000000001/confirm "
        "needs the confirm right, role viewer lacks it"
    ) in refusals


async def test_a_refused_call_changes_nothing(api: Api) -> None:
    command_id = (await api.enqueue("dev-1", mode="confirm", command_type="unlock")).json()["id"]

    viewer_enqueue = await api.client.post(
        "/devices/dev-2/commands", json={"payload": "x", "ttl": 60}, headers=AS[Role.VIEWER]
    )
    operator_confirm = await api.client.post(
        f"/commands/{command_id}/confirm", headers=AS[Role.OPERATOR]
    )
    viewer_cancel = await api.client.post(f"/commands/{command_id}/cancel", headers=AS[Role.VIEWER])

    assert [viewer_enqueue.status_code, operator_confirm.status_code] == [403, 403]
    assert viewer_cancel.status_code == 403
    assert "needs the role approver" in operator_confirm.json()["detail"]
    assert await api.backends.store.get_pending("dev-2") == []
    assert await api.backends.store.get_status(command_id) == CommandStatus.AWAITING_CONFIRMATION


async def test_whoami_names_the_caller_its_role_and_rights(api: Api) -> None:
    viewer = await api.client.get("/whoami", headers=AS[Role.VIEWER])
    full = await api.client.get("/whoami")

    assert viewer.json() == {"name": "val", "role": "viewer", "rights": ["read"]}
    assert full.json() == {
        "name": "alice",
        "role": "full",
        "rights": ["confirm", "operate", "read"],
    }


async def test_the_console_loads_without_a_token_and_allows_only_its_own_scripts(
    api: Api,
) -> None:
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        page = await anonymous.get("/")
        scripts = [await anonymous.get(f"/console/{name}") for name in ("render.js", "app.js")]
        style = await anonymous.get("/console/style.css")
        missing = await anonymous.get("/console/../api.py")
        unknown = await anonymous.get("/console/secrets.txt")
        listing = await anonymous.get("/devices/dev-1/commands")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/console/render.js"' in page.text
    assert '<script src="/console/app.js"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # The scripts never hand data to the HTML parser (the browser test shows it stays text).
    parsers = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write")
    for script in scripts:
        assert script.headers["content-type"].startswith("text/javascript")
        assert [word for word in parsers if word in script.text] == []
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
    assert listing.status_code == 401
