"""The fleet part of the OpenAPI document (:mod:`amqp_queue.fleet_api`): outcome reports,
rollouts, retiring a device; :func:`amqp_queue.openapi.document` merges it in."""

from __future__ import annotations

from typing import Any

from amqp_queue.state.model import CommandStatus
from amqp_queue.state.validation import Limits

_ERROR = {"$ref": "#/components/schemas/Error"}
_SECURED: dict[str, Any] = {"security": [{"bearer": []}]}

_MEANING = {
    400: "Bad input (the detail says what is wrong); nothing was written.",
    401: "Missing or wrong bearer token.",
    403: "The token's role lacks the right this call needs; the detail names the role that "
    "has it. Audited.",
    404: "No such command (unknown or pruned).",
    409: "A device's queue exists with another queue type; nothing was written.",
    413: "The request body is too large.",
    429: "A device already holds its limit of open commands (max_pending_per_device, "
    "named in the detail); nothing was written.",
    503: "The broker or the state index is unavailable; retry.",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses(ok: dict[str, Any], *codes: int, **meaning: str) -> dict[str, Any]:
    """``ok`` and the errors ``codes``, 403 included; ``meaning`` (``e404=...``) rewords one."""
    texts = {code: meaning.get(f"e{code}", _MEANING[code]) for code in (*codes, 403)}
    return {**ok, **{str(code): _json(_ERROR, text) for code, text in sorted(texts.items())}}


def _param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _body(name: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{name}"}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def fleet_paths() -> dict[str, Any]:
    """The fleet routes, each needing a token."""
    rollout = _param("rollout_id", {"type": "string", "format": "uuid"})
    command = _param("command_id", {"type": "string"})
    device = _param("device_id", {"$ref": "#/components/schemas/DeviceId"})
    no_rollout = "No such rollout (unknown, or every command of it pruned)."
    summary = {"$ref": "#/components/schemas/RolloutSummary"}

    def counted(field: str, what: str) -> dict[str, Any]:
        schema = {
            "type": "object",
            "properties": {"rollout_id": {"type": "string"}, field: {"type": "integer"}},
        }
        return {"200": _json(schema, what)}

    return {
        "/commands/{command_id}/outcome": {
            "post": {
                "summary": "Report how a delivered command went (a gateway, for its device); "
                "audited. The same report twice is harmless",
                "parameters": [command],
                "requestBody": _body("OutcomeReport"),
                "responses": _responses(
                    {"200": _json({"$ref": "#/components/schemas/Status"}, "The outcome.")},
                    400,
                    401,
                    404,
                    409,
                    413,
                    503,
                    e409="Refused: the command was never delivered (awaiting, pending, or "
                    "ended without delivery), or it already has another outcome.",
                ),
                **_SECURED,
            }
        },
        "/rollouts": {
            "post": {
                "summary": "Queue one command for each device in one atomic write (a rollout); "
                "audited",
                "requestBody": _body("RolloutRequest"),
                "responses": _responses(
                    {
                        "201": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "rollout_id": {"type": "string", "format": "uuid"},
                                    "command_ids": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                            "Accepted: durable in the state index; command ids in the order "
                            "of device_ids.",
                        )
                    },
                    400,
                    401,
                    409,
                    413,
                    429,
                    503,
                ),
                **_SECURED,
            }
        },
        "/rollouts/{rollout_id}": {
            "get": {
                "summary": "A rollout's commands counted by status (one index query)",
                "parameters": [rollout],
                "responses": _responses(
                    {"200": _json(summary, "Every status, zeros included.")},
                    401,
                    404,
                    503,
                    e404=no_rollout,
                ),
                **_SECURED,
            }
        },
        "/rollouts/{rollout_id}/confirm": {
            "post": {
                "summary": "Confirm every command of the rollout awaiting confirmation; audited",
                "parameters": [rollout],
                "responses": _responses(
                    counted("confirmed", "How many this call confirmed."),
                    401,
                    404,
                    503,
                    e404=no_rollout,
                ),
                **_SECURED,
            }
        },
        "/rollouts/{rollout_id}/cancel": {
            "post": {
                "summary": "Cancel every open command of the rollout; audited",
                "parameters": [rollout],
                "responses": _responses(
                    counted("cancelled", "How many this call cancelled."),
                    401,
                    404,
                    503,
                    e404=no_rollout,
                ),
                **_SECURED,
            }
        },
        "/devices/{device_id}/retire": {
            "post": {
                "summary": "Retire a device: cancel its open commands (they stay queryable, "
                "cancelled) and delete its queue; audited",
                "parameters": [device],
                "responses": _responses(
                    {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "device_id": {"$ref": "#/components/schemas/DeviceId"},
                                    "cancelled": {"type": "integer"},
                                },
                            },
                            "How many open commands it cancelled.",
                        )
                    },
                    400,
                    401,
                    503,
                ),
                **_SECURED,
            }
        },
    }


def fleet_schemas(limits: Limits, payload: dict[str, Any]) -> dict[str, Any]:
    """The fleet request and answer bodies; ``payload`` is the enqueue's payload fields."""
    longest = limits.max_ttl.total_seconds()
    most = int(longest) if longest.is_integer() else longest
    seconds = {"type": "number", "exclusiveMinimum": 0, "maximum": most}
    return {
        "OutcomeReport": {
            "type": "object",
            "required": ["outcome"],
            "additionalProperties": False,
            "properties": {
                "outcome": {"enum": ["succeeded", "failed"]},
                "result": {
                    "type": "string",
                    "description": f"succeeded only, optional: at most "
                    f"{limits.max_payload_bytes} bytes, UTF-8 text or base64 (encoding).",
                },
                "encoding": {"enum": ["utf-8", "base64"], "default": "utf-8"},
                "reason": {
                    "type": "string",
                    "maxLength": limits.max_reason_length,
                    "description": "failed only, required.",
                },
            },
        },
        "Outcome": {
            "type": "object",
            "properties": {
                "status": {"enum": ["succeeded", "failed", "timed_out"]},
                "result": {"type": "string"},
                "encoding": {"enum": ["utf-8", "base64"]},
                "reason": {"type": "string"},
                "reported_at": {"type": "string", "format": "date-time"},
            },
        },
        "RolloutRequest": {
            "type": "object",
            "required": ["device_ids", "payload", "ttl"],
            "additionalProperties": False,
            "properties": {
                "device_ids": {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"$ref": "#/components/schemas/DeviceId"},
                },
                **payload,
                "ttl": {**seconds, "description": "Seconds."},
                "command_type": {
                    "$ref": "#/components/schemas/CommandType",
                    "description": "Each command replaces its device's open command of this "
                    "type (latest wins); required with requires_confirmation.",
                },
                "requires_confirmation": {"type": "boolean", "default": False},
                "outcome_timeout": {
                    **seconds,
                    "description": "Seconds after delivery; a command with no outcome by then "
                    "becomes timed_out at cleanup.",
                },
            },
        },
        "RolloutSummary": {
            "type": "object",
            "properties": {
                "rollout_id": {"type": "string", "format": "uuid"},
                "total": {"type": "integer"},
                "counts": {
                    "type": "object",
                    "properties": {status.value: {"type": "integer"} for status in CommandStatus},
                },
            },
        },
    }
