"""The operator API's fleet endpoints: outcomes (rule 9), rollouts (rule 10), retiring a device.

A mixin of :class:`~amqp_queue.api.OperatorApi`, which routes them through its one table of
protected routes (each with the right its caller needs) and answers their errors.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from amqp_queue import command_io
from amqp_queue.four_eyes import check_rollout_approver
from amqp_queue.state.errors import InvalidInput, InvalidTTL
from amqp_queue.state.model import OUTCOMES, CommandStatus
from amqp_queue.store import RabbitMQStore

OUTCOME_FIELDS = ("outcome", "result", "encoding", "reason")
ROLLOUT_FIELDS = (
    "device_ids",
    "payload",
    "encoding",
    "ttl",
    "command_type",
    "requires_confirmation",
    "outcome_timeout",
)


class AuditNote(Protocol):
    """What the audit line says of an action that succeeded; the action may refine it."""

    text: str


def check_fields(body: dict[str, Any], known: tuple[str, ...]) -> None:
    """Raises InvalidInput naming the fields of ``body`` that are not ``known``."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(known)}")


def seconds(body: dict[str, Any], name: str, *, required: bool) -> float | None:
    """The number of seconds ``body[name]`` holds (None when absent and not required)."""
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        need = "is required, as" if required else "must be"
        error = InvalidTTL if name == "ttl" else InvalidInput
        raise error(f"{name} {need} a number of seconds, not {value!r}")
    return float(value)


class FleetEndpoints:
    """Outcome reports, rollouts and retiring a device, over the host's store."""

    _store: RabbitMQStore
    _four_eyes: bool

    if TYPE_CHECKING:  # provided by OperatorApi

        async def _read_object(self, request: Request) -> dict[str, Any]: ...

        def _audit(
            self, operator: str, action: str, subject: str
        ) -> AbstractContextManager[AuditNote]: ...

    async def outcome(self, request: Request, operator: str) -> Response:
        """``POST /commands/{id}/outcome``: a gateway reports how a delivered command went."""
        command_id = request.path_params["command_id"]
        body = await self._read_object(request)
        check_fields(body, OUTCOME_FIELDS)
        kind = body.get("outcome")
        with self._audit(operator, "reported the outcome of", f"command {command_id}") as note:
            if kind == CommandStatus.SUCCEEDED.value:
                if "reason" in body:
                    raise InvalidInput("a succeeded outcome has a result, not a reason")
                result = None
                if body.get("result") is not None:
                    result = command_io.decode_payload(
                        body["result"], body.get("encoding", command_io.Encoding.UTF8.value)
                    )
                await self._store.complete_command(command_id, result)
            elif kind == CommandStatus.FAILED.value:
                if "result" in body or "encoding" in body:
                    raise InvalidInput("a failed outcome has a reason, not a result")
                if "reason" not in body:
                    raise InvalidInput("a failed outcome needs a reason")
                await self._store.fail_command(command_id, body["reason"])
            else:
                raise InvalidInput(f"outcome must be succeeded or failed, not {kind!r}")
            note.text = f"ok, {kind}"
        return await self.command_json(command_id)

    async def command_json(self, command_id: str) -> JSONResponse:
        """A command's status, with its outcome once it has one."""
        status = await self._store.get_status(command_id)
        data: dict[str, Any] = {"id": command_id, "status": status.value}
        if status in OUTCOMES:
            outcome = await self._store.get_outcome(command_id)
            if outcome is not None:
                data["outcome"] = command_io.outcome_json(outcome)
        return JSONResponse(data)

    async def create_rollout(self, request: Request, operator: str) -> Response:
        """``POST /rollouts``: one command for each device, in one atomic write."""
        body = await self._read_object(request)
        check_fields(body, ROLLOUT_FIELDS)
        devices = body.get("device_ids")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise InvalidInput("device_ids is required, as a list of device id strings")
        if "payload" not in body:
            raise InvalidInput("payload is required")
        ttl = seconds(body, "ttl", required=True)
        assert ttl is not None
        confirm = body.get("requires_confirmation", False)
        if not isinstance(confirm, bool):
            raise InvalidInput(f"requires_confirmation must be true or false, not {confirm!r}")
        payload = command_io.decode_payload(
            body["payload"], body.get("encoding", command_io.Encoding.UTF8.value)
        )
        timeout = seconds(body, "outcome_timeout", required=False)
        with self._audit(operator, "create", f"rollout for {len(devices)} devices") as note:
            rollout = await self._store.enqueue_many(
                devices,
                payload,
                ttl,
                command_type=body.get("command_type"),
                requires_confirmation=confirm,
                outcome_timeout=timeout,
                by=operator,
            )
            state = "awaiting confirmation" if confirm else "ready"
            note.text = f"ok, rollout {rollout.rollout_id}, {state}"
        return JSONResponse(
            {"rollout_id": rollout.rollout_id, "command_ids": list(rollout.command_ids)},
            status_code=201,
            headers={"Location": f"/rollouts/{rollout.rollout_id}"},
        )

    async def rollout_status(self, request: Request, operator: str) -> Response:
        """``GET /rollouts/{id}``: the rollout's commands counted by status."""
        summary = await self._store.rollout_summary(request.path_params["rollout_id"])
        return JSONResponse(command_io.rollout_json(summary))

    async def confirm_rollout(self, request: Request, operator: str) -> Response:
        """``POST /rollouts/{id}/confirm``: approves every member awaiting confirmation."""
        rollout_id = request.path_params["rollout_id"]
        with self._audit(operator, "confirm", f"rollout {rollout_id}") as note:
            if self._four_eyes:
                summary = await self._store.rollout_summary(rollout_id)
                enqueued_by = await self._store.rollout_enqueuer(rollout_id)
                check_rollout_approver(summary, enqueued_by, operator)
            confirmed = await self._store.confirm_rollout(rollout_id, by=operator)
            note.text = f"ok, {confirmed} confirmed"
        return JSONResponse({"rollout_id": rollout_id, "confirmed": confirmed})

    async def cancel_rollout(self, request: Request, operator: str) -> Response:
        """``POST /rollouts/{id}/cancel``: cancels every open member."""
        rollout_id = request.path_params["rollout_id"]
        with self._audit(operator, "cancel", f"rollout {rollout_id}") as note:
            cancelled = await self._store.cancel_rollout(rollout_id, by=operator)
            note.text = f"ok, {cancelled} cancelled"
        return JSONResponse({"rollout_id": rollout_id, "cancelled": cancelled})

    async def retire(self, request: Request, operator: str) -> Response:
        """``POST /devices/{id}/retire``: cancels the device's open commands, drops its queue."""
        device = request.path_params["device_id"]
        with self._audit(operator, "retire", f"device {device}") as note:
            cancelled = await self._store.retire_device(device)
            note.text = f"ok, {cancelled} open commands cancelled, queue deleted"
        return JSONResponse({"device_id": device, "cancelled": cancelled})
