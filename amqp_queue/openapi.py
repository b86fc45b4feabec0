"""The OpenAPI 3.1 document of the operator API, served at ``/openapi.json``.

Written out rather than generated: the API is small, and a test checks that every route is
documented with the methods it answers.
"""

from __future__ import annotations

import math
from typing import Any

from amqp_queue.console_page import ASSETS
from amqp_queue.openapi_fleet import fleet_paths, fleet_schemas
from amqp_queue.openapi_views import view_paths, view_schemas
from amqp_queue.state.model import CommandStatus
from amqp_queue.state.validation import COMMAND_TYPE_PATTERN, DEVICE_ID_PATTERN, Limits

_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
"""Padded standard base64, as the API decodes it (``base64.b64decode(validate=True)``)."""


def _errors(*codes: int, not_found: str = "No such command (unknown or pruned).") -> dict[str, Any]:
    meaning = {
        400: "Bad input (the detail says what is wrong); nothing was written.",
        401: "Missing or wrong bearer token.",
        403: "The token's role lacks the right this call needs (the detail names the role "
        "that has it), or, on a confirm with four eyes on, the token enqueued the command "
        "itself (error four_eyes). Audited.",
        404: not_found,
        409: "The device's queue exists with another queue type; the detail says which.",
        410: "The command expired.",
        413: "The request body is too large.",
        503: "The broker or the state index is unavailable; retry.",
    }
    return {str(code): _json(_ERROR, meaning[code]) for code in codes}


def _device() -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/DeviceId"}
    return {"name": "device_id", "in": "path", "required": True, "schema": schema}


def _command() -> dict[str, Any]:
    return {"name": "command_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    if "security" in extra:
        # Every call that needs a token also needs a role with the route's right.
        responses = {**responses, **_errors(403)}
    return {"summary": summary, "responses": responses, **extra}


def document(max_body_bytes: int, limits: Limits) -> dict[str, Any]:
    """The OpenAPI document; ``max_body_bytes`` is stated on the enqueue body, and the store's
    ``limits`` on the device id, command type, payload and ttl."""
    status_ref = {"$ref": "#/components/schemas/Status"}
    record_ref = {"$ref": "#/components/schemas/CommandRecord"}
    listing = {"$ref": "#/components/schemas/CommandList"}
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "amqp-queue operator API", "version": "1"},
        "paths": {
            "/devices/{device_id}/commands": {
                "post": _operation(
                    "Enqueue a command for a device",
                    {
                        "201": _json(status_ref, "Accepted: durable in the state index."),
                        **_errors(400, 401, 409, 413, 503),
                    },
                    parameters=[_device()],
                    requestBody={
                        "required": True,
                        "description": f"At most {max_body_bytes} bytes.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/EnqueueRequest"}
                            }
                        },
                    },
                    **secured,
                ),
                "get": _operation(
                    "List the device's pending commands (awaiting confirmation included)",
                    {"200": _json(listing, "Oldest write first."), **_errors(400, 401, 503)},
                    parameters=[_device()],
                    **secured,
                ),
            },
            "/devices/{device_id}/confirmations": {
                "get": _operation(
                    "List the device's commands awaiting confirmation",
                    {"200": _json(listing, "Oldest write first."), **_errors(400, 401, 503)},
                    parameters=[_device()],
                    **secured,
                )
            },
            **view_paths(_operation, _json, _errors, _device(), secured),
            "/commands/{command_id}": {
                "get": _operation(
                    "Get a command's whole record: status, payload, times, who enqueued, "
                    "confirmed or cancelled it",
                    {
                        "200": _json(record_ref, "The record."),
                        **_errors(401, 404, 503),
                    },
                    parameters=[_command()],
                    **secured,
                )
            },
            "/commands/{command_id}/confirm": {
                "post": _operation(
                    "Confirm a command; audited. Confirming twice, or a command that needs "
                    "no confirmation or was delivered, is harmless: it changes nothing and "
                    "answers the command's status",
                    {
                        "200": _json(status_ref, "The command's status after the confirm."),
                        **_errors(
                            401,
                            404,
                            409,
                            410,
                            503,
                            not_found="No such command (unknown, pruned, superseded, "
                            "cancelled or rejected).",
                        ),
                    },
                    parameters=[_command()],
                    **secured,
                )
            },
            "/commands/{command_id}/cancel": {
                "post": _operation(
                    "Cancel an undelivered command; audited",
                    {
                        "200": _json(status_ref, "Cancelled."),
                        **_errors(
                            401,
                            404,
                            410,
                            503,
                            not_found="No such command, or none left to cancel (unknown, "
                            "pruned, delivered, superseded, cancelled or rejected).",
                        ),
                    },
                    parameters=[_command()],
                    **secured,
                )
            },
            "/cleanup": {
                "post": _operation(
                    "End expired commands and prune old finished ones",
                    {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"expired": {"type": "integer"}},
                            },
                            "How many commands expired.",
                        ),
                        **_errors(401, 503),
                    },
                    **secured,
                )
            },
            "/whoami": {
                "get": _operation(
                    "The calling token's name, role and rights (the console shows only the "
                    "buttons these allow)",
                    {
                        "200": _json({"$ref": "#/components/schemas/Caller"}, "The caller."),
                        **_errors(401),
                    },
                    **secured,
                )
            },
            **fleet_paths(),
            "/": {
                "get": _operation(
                    "The operator console, an HTML page (no token to load it; it asks for "
                    "one and calls this API with it)",
                    {"200": {"description": "HTML."}},
                )
            },
            "/console/{asset}": {
                "get": _operation(
                    "The console's files: page, script, style sheet and icon (no token)",
                    {"200": {"description": "The file."}, **_errors(404)},
                    parameters=[
                        {
                            "name": "asset",
                            "in": "path",
                            "required": True,
                            "schema": {"enum": sorted(ASSETS)},
                        }
                    ],
                )
            },
            "/healthz": {
                "get": _operation(
                    "Whether the broker and the state index are reachable (no token)",
                    {
                        "200": _json({"type": "object"}, "Both reachable."),
                        "503": _json({"type": "object"}, "One is not; the body says which."),
                    },
                )
            },
            "/metrics": {
                "get": _operation(
                    "Prometheus metrics (no token)",
                    {"200": {"description": "Prometheus text format."}},
                )
            },
            "/openapi.json": {
                "get": _operation(
                    "This document (no token)", {"200": _json({"type": "object"}, "OpenAPI.")}
                )
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {**_schemas(limits), **view_schemas()},
        },
    }


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


def _schemas(limits: Limits) -> dict[str, Any]:
    most = limits.max_payload_bytes
    payload = {
        "payload": {
            "type": "string",
            "description": f"At most {most} bytes: UTF-8 text, or base64 of the bytes.",
        },
        "encoding": {"enum": ["utf-8", "base64"], "default": "utf-8"},
    }
    # JSON Schema counts characters: every character is at least one byte of UTF-8, and
    # base64 takes 4 characters for every 3 bytes (padded).
    sized_payload = {
        "if": {"required": ["encoding"], "properties": {"encoding": {"const": "base64"}}},
        "then": {
            "properties": {"payload": {"maxLength": 4 * math.ceil(most / 3), "pattern": _BASE64}}
        },
        "else": {"properties": {"payload": {"maxLength": most}}},
    }
    command_type = {"$ref": "#/components/schemas/CommandType"}
    return {
        **fleet_schemas(limits, payload),
        "DeviceId": {
            "type": "string",
            "minLength": 1,
            "maxLength": limits.max_device_id_length,
            "pattern": DEVICE_ID_PATTERN,
            "description": "ASCII letters, digits and _ . : @ -, starting with a letter or "
            "digit, without '..' and not starting with 'amq.' (any case).",
        },
        "CommandType": {
            "type": "string",
            "minLength": 1,
            "maxLength": limits.max_command_type_length,
            "pattern": COMMAND_TYPE_PATTERN,
            "description": "ASCII letters, digits and _ . : / -, starting with a letter or digit.",
        },
        "EnqueueRequest": {
            "type": "object",
            "required": ["payload", "ttl"],
            "additionalProperties": False,
            "properties": {
                **payload,
                "ttl": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": _number(limits.max_ttl.total_seconds()),
                    "description": "Seconds; at least one microsecond.",
                },
                "outcome_timeout": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": _number(limits.max_ttl.total_seconds()),
                    "description": "Optional: seconds after delivery; a command with no "
                    "outcome by then becomes timed_out at cleanup.",
                },
                "mode": {
                    "enum": ["plain", "latest", "confirm"],
                    "default": "plain",
                    "description": "plain: enqueue; latest: replaces the undelivered command "
                    "of its type; confirm: delivered only after confirmation.",
                },
                "command_type": {
                    "oneOf": [command_type, {"type": "null"}],
                    "description": "Required for latest and confirm, absent for plain.",
                },
            },
            "allOf": [sized_payload],
        },
        "Status": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "status": {"enum": [status.value for status in CommandStatus]},
                "outcome": {"$ref": "#/components/schemas/Outcome"},
            },
        },
        "Command": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "device_id": {"$ref": "#/components/schemas/DeviceId"},
                "command_type": {"oneOf": [command_type, {"type": "null"}]},
                **payload,
                "requires_confirmation": {"type": "boolean"},
                "confirmed": {"type": "boolean"},
                "created_at": {"type": "string", "format": "date-time"},
                "expires_at": {"type": "string", "format": "date-time"},
            },
        },
        "CommandList": {
            "type": "object",
            "properties": {
                "device_id": {"$ref": "#/components/schemas/DeviceId"},
                "commands": {"type": "array", "items": {"$ref": "#/components/schemas/Command"}},
            },
        },
        "Error": {
            "type": "object",
            "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        },
        "Caller": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "role": {"enum": ["viewer", "operator", "approver", "full"]},
                "rights": {
                    "type": "array",
                    "items": {"enum": ["read", "operate", "confirm"]},
                },
            },
        },
    }
