"""The operator HTTP API: enqueue, list, inspect, confirm and cancel commands, and clean up.

Starlette on uvicorn rather than FastAPI: the API is nine small JSON endpoints whose input
rules (and their error messages) already live in the store, so FastAPI's pydantic models
would only restate them and answer bad input with 422 instead of the 400 operators expect.
Starlette (with anyio) is the smallest ASGI toolkit that routes, streams a body we can cap,
and runs on uvicorn; the OpenAPI document is written out in :mod:`amqp_queue.openapi`.

Every endpoint but ``/healthz``, ``/metrics``, ``/openapi.json`` and the console's page and
assets (:mod:`amqp_queue.console_page`) needs a bearer token, and the token's role must carry the
right the route declares in :data:`PROTECTED` (else 403, audited). Errors are translated to
HTTP here, at the boundary, from the one :class:`QueueError` tree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from amqp_queue import command_io, console_page
from amqp_queue.auth import CONFIGURABLE_ROLES, ROLE_RIGHTS, Caller, Right, Tokens
from amqp_queue.errors import BrokerError, CommandRejected, QueueMismatch
from amqp_queue.fleet_api import FleetEndpoints, seconds
from amqp_queue.fleet_views import FleetViews, record_json
from amqp_queue.four_eyes import SelfApproval, check_approver
from amqp_queue.metrics import CONTENT_TYPE, PrometheusObserver
from amqp_queue.openapi import document
from amqp_queue.state.errors import (
    CommandExpired,
    CommandNotFound,
    InvalidInput,
    InvalidTTL,
    OutboxTaken,
    OutcomeRejected,
    QueueError,
    QueueFull,
    RolloutNotFound,
    StateError,
)
from amqp_queue.state.model import PendingCommand
from amqp_queue.store import RabbitMQStore

logger = logging.getLogger("amqp_queue.api")
audit = logging.getLogger("amqp_queue.api.audit")

HealthCheck = Callable[[], Awaitable[dict[str, str]]]
"""Reports each dependency (``broker``, ``state``) as ``"ok"`` or what is wrong with it."""

Handler = Callable[[Request, str], Awaitable[Response]]
"""An endpoint that runs once the request's token is known; gets the token's name."""


class BodyTooLarge(InvalidInput):
    """The request body is over the API's limit (HTTP 413)."""


ERROR_STATUS: tuple[tuple[type[QueueError], int, str], ...] = (
    (BodyTooLarge, 413, "body_too_large"),
    (InvalidInput, 400, "invalid_input"),
    (CommandExpired, 410, "expired"),
    (CommandNotFound, 404, "not_found"),
    (RolloutNotFound, 404, "rollout_not_found"),
    (OutcomeRejected, 409, "outcome_rejected"),
    (QueueFull, 429, "queue_full"),
    (QueueMismatch, 409, "queue_mismatch"),
    (OutboxTaken, 409, "outbox_taken"),
    (CommandRejected, 422, "rejected"),
    (SelfApproval, 403, "four_eyes"),
    (StateError, 503, "state_unavailable"),
    (BrokerError, 503, "broker_unavailable"),
)
"""HTTP status and error code of each error; the first matching class wins."""

PROTECTED: tuple[tuple[str, str, str, Right], ...] = (
    ("/devices/{device_id}/commands", "POST", "enqueue", Right.OPERATE),
    ("/devices/{device_id}/commands", "GET", "pending", Right.READ),
    ("/devices/{device_id}/confirmations", "GET", "confirmations", Right.READ),
    ("/commands/{command_id}", "GET", "status", Right.READ),
    ("/commands/{command_id}/confirm", "POST", "confirm", Right.CONFIRM),
    ("/commands/{command_id}/cancel", "POST", "cancel", Right.OPERATE),
    ("/cleanup", "POST", "cleanup", Right.OPERATE),
    ("/whoami", "GET", "whoami", Right.READ),
    # Fleet operations (amqp_queue.fleet_api): a gateway reporting outcomes operates.
    ("/commands/{command_id}/outcome", "POST", "outcome", Right.OPERATE),
    ("/rollouts", "POST", "create_rollout", Right.OPERATE),
    ("/rollouts/{rollout_id}", "GET", "rollout_status", Right.READ),
    ("/rollouts/{rollout_id}/confirm", "POST", "confirm_rollout", Right.CONFIRM),
    ("/rollouts/{rollout_id}/cancel", "POST", "cancel_rollout", Right.OPERATE),
    ("/devices/{device_id}/retire", "POST", "retire", Right.OPERATE),
    # The console's fleet-wide views (amqp_queue.fleet_views).
    ("/confirmations", "GET", "inbox", Right.READ),
    ("/devices", "GET", "devices", Right.READ),
    ("/devices/{device_id}/history", "GET", "history", Right.READ),
)
"""Every endpoint that needs a token: path, method, handler and the right its caller needs."""

ENQUEUE_FIELDS = ("payload", "encoding", "ttl", "mode", "command_type", "outcome_timeout")


def error_status(exc: QueueError) -> tuple[int, str]:
    """The HTTP status and error code an error is answered with."""
    for kind, status, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return status, code
    return 500, "internal_error"


def _error(status: int, code: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class OperatorApi(FleetEndpoints, FleetViews):
    """The API's endpoints over one store.

    Args:
        store: the store commands go to; the caller owns it.
        tokens: the bearer tokens that may call the protected endpoints.
        metrics: the observer the store reports to; ``/metrics`` renders it.
        health: checks the broker and the state for ``/healthz``.
        max_body_bytes: the largest request body read; a larger one is answered with 413.
        four_eyes: refuse a token confirming a command it enqueued (403, audited).
    """

    def __init__(
        self,
        store: RabbitMQStore,
        *,
        tokens: Tokens,
        metrics: PrometheusObserver,
        health: HealthCheck,
        max_body_bytes: int,
        four_eyes: bool = False,
    ) -> None:
        self._store = store
        self._four_eyes = four_eyes
        self._tokens = tokens
        self._metrics = metrics
        self._health = health
        self._max_body = max_body_bytes
        self._openapi = document(max_body_bytes, store.limits)

    def app(self) -> Starlette:
        """The ASGI application."""
        routes: list[BaseRoute] = [
            Route(path, self._guarded(getattr(self, handler), right), methods=[method])
            for path, method, handler, right in PROTECTED
        ]
        routes += [
            Route("/healthz", self.healthz),
            Route("/metrics", self.metrics),
            Route("/openapi.json", self.openapi),
            *console_page.routes(),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
        # No redirects: a path parameter with an encoded '/' ("gw%2F7", "0%2F") decodes into
        # an extra segment, and a redirect would hide the refusal the caller must see.
        app.router.redirect_slashes = False
        return app

    # -- protected endpoints -------------------------------------------------------------

    async def enqueue(self, request: Request, operator: str) -> Response:
        body = await self._read_object(request)
        unknown = sorted(set(body) - set(ENQUEUE_FIELDS))
        if unknown:
            raise InvalidInput(
                f"unknown field(s) {', '.join(unknown)}; expected {', '.join(ENQUEUE_FIELDS)}"
            )
        if "payload" not in body:
            raise InvalidInput("payload is required")
        ttl = body.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise InvalidTTL(f"ttl is required, as a number of seconds, not {ttl!r}")
        mode = command_io.parse_mode(body.get("mode", command_io.Mode.PLAIN.value))
        payload = command_io.decode_payload(
            body["payload"], body.get("encoding", command_io.Encoding.UTF8.value)
        )
        command_id = await command_io.enqueue(
            self._store,
            device_id=request.path_params["device_id"],
            payload=payload,
            ttl=ttl,
            mode=mode,
            command_type=body.get("command_type"),
            outcome_timeout=seconds(body, "outcome_timeout", required=False),
            by=operator,
        )
        audit.info("operator %s enqueued %s command %s", operator, mode.value, command_id)
        return JSONResponse(
            {"id": command_id, "status": command_io.initial_status(mode).value},
            status_code=201,
            headers={"Location": f"/commands/{command_id}"},
        )

    async def pending(self, request: Request, operator: str) -> Response:
        device = request.path_params["device_id"]
        return _commands(device, await self._store.get_pending(device))

    async def confirmations(self, request: Request, operator: str) -> Response:
        device = request.path_params["device_id"]
        return _commands(device, await self._store.get_pending_confirmations(device))

    async def status(self, request: Request, operator: str) -> Response:
        command_id = request.path_params["command_id"]
        # The whole record; ``id`` and ``status`` first, as before it was whole.
        record = await self._store.get_command(command_id)
        return JSONResponse(record_json(record, self._store.state.clock()))

    async def confirm(self, request: Request, operator: str) -> Response:
        command_id = request.path_params["command_id"]
        with _audited(operator, "confirm", command_id) as outcome:
            if self._four_eyes:
                check_approver(await self._store.get_command(command_id), operator)
            if not await self._store.confirm_changed(command_id, by=operator):
                outcome.text = "ok, nothing changed (no confirmation needed)"
        status = await self._store.get_status(command_id)
        return JSONResponse({"id": command_id, "status": status.value})

    async def cancel(self, request: Request, operator: str) -> Response:
        command_id = request.path_params["command_id"]
        with _audited(operator, "cancel", command_id):
            await self._store.cancel_command(command_id, by=operator)
        return JSONResponse({"id": command_id, "status": "cancelled"})

    async def cleanup(self, request: Request, operator: str) -> Response:
        expired = await self._store.cleanup()
        audit.info("operator %s ran cleanup: %d expired", operator, expired)
        return JSONResponse({"expired": expired})

    async def whoami(self, request: Request, operator: str) -> Response:
        # The console asks this once at sign-in, to show only the buttons the role allows.
        role = self._tokens.role(operator)
        rights = sorted(right.value for right in Right if Caller(operator, role).may(right))
        return JSONResponse({"name": operator, "role": role.value, "rights": rights})

    # -- open endpoints ------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        checks = await self._health()
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", **checks},
            status_code=200 if healthy else 503,
        )

    async def metrics(self, request: Request) -> Response:
        return Response(self._metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    # -- plumbing ------------------------------------------------------------------------

    def _audit(self, operator: str, action: str, subject: str) -> AbstractContextManager[_Outcome]:
        return _audited(operator, action, subject, kind="")

    def _guarded(self, handler: Handler, right: Right) -> Callable[[Request], Awaitable[Response]]:
        """Checks the bearer token and its right, runs the handler, answers errors with their
        status."""

        async def endpoint(request: Request) -> Response:
            caller = self._tokens.caller(request.headers.get("authorization"))
            if caller is None:
                return _error(
                    401,
                    "unauthorized",
                    "a valid bearer token is required (Authorization: Bearer <token>)",
                    **{"WWW-Authenticate": 'Bearer realm="amqp-queue"'},
                )
            if not caller.may(right):
                audit.info(
                    "operator %s refused: %s %s needs the %s right, role %s lacks it",
                    caller.name,
                    request.method,
                    request.url.path,
                    right.value,
                    caller.role.value,
                )
                return _error(
                    403,
                    "forbidden",
                    f"token {caller.name!r} has the role {caller.role.value}, which may not "
                    f"{right.value}; {request.method} {request.url.path} needs "
                    f"{_roles_with(right)}",
                )
            operator = caller.name
            try:
                return await handler(request, operator)
            except QueueError as exc:
                status, code = error_status(exc)
                if status >= 500:
                    logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
                return _error(status, code, str(exc))

        return endpoint

    async def _read_object(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object, read up to the size limit.

        Raises:
            BodyTooLarge: the body is over the limit (checked before reading when declared).
            InvalidInput: the body is not a JSON object.
        """
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            raise BodyTooLarge(f"request body of {declared} bytes is over {self._max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self._max_body:
                raise BodyTooLarge(f"request body is over {self._max_body} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad JSON, bad UTF-8 and integers too long to convert.
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"request body must be a JSON object, not {type(data).__name__}")
        return data


@dataclass
class _Outcome:
    """What the audit line says of an action that succeeded; the action may refine it."""

    text: str = "ok"


@contextmanager
def _audited(
    operator: str, action: str, command_id: str, *, kind: str = "command "
) -> Iterator[_Outcome]:
    """Logs an operator's action on a command (or on what ``kind`` names: ``""`` when
    ``command_id`` names it itself, "rollout <id>") with its outcome and the token's name."""
    outcome = _Outcome()
    subject = kind + command_id
    try:
        yield outcome
    except QueueError as exc:
        audit.info("operator %s %s %s: %s", operator, action, subject, error_status(exc)[1])
        raise
    audit.info("operator %s %s %s: %s", operator, action, subject, outcome.text)


def _roles_with(right: Right) -> str:
    names = [role.value for role in CONFIGURABLE_ROLES if right in ROLE_RIGHTS[role]]
    return "the role " + " or ".join(names)


def _commands(device_id: str, commands: list[PendingCommand]) -> JSONResponse:
    return JSONResponse(
        {"device_id": device_id, "commands": [command_io.command_json(c) for c in commands]}
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods answer in the same JSON shape as every other error.
    assert isinstance(exc, HTTPException)
    raw_path = bytes(request.scope.get("raw_path") or b"").lower()
    if exc.status_code == 404 and b"%2f" in raw_path:
        # Decoded, an encoded '/' makes an extra path segment. Ids never hold one: a command
        # id that is no UUID is an unknown command (404, as for any other), a device id with
        # a character queue names cannot hold is bad input (400).
        if raw_path.startswith(b"/commands/"):
            return _error(404, "not_found", "no such command: command ids are UUIDs")
        if raw_path.startswith(b"/rollouts/"):
            return _error(404, "rollout_not_found", "no such rollout: rollout ids are UUIDs")
        return _error(
            400,
            "invalid_input",
            "a device id cannot contain '/' (it was sent as %2F in the path)",
        )
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail), **(exc.headers or {}))
