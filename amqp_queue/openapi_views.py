"""The fleet-wide views' part of the OpenAPI document (:mod:`amqp_queue.fleet_views`):
their paths and schemas, merged into :func:`amqp_queue.openapi.document`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from amqp_queue.fleet_views import MAX_PAGE, PREVIEW_BYTES
from amqp_queue.state.model import CommandStatus

_TIME = {"type": "string", "format": "date-time"}
_MAYBE_TIME = {"oneOf": [_TIME, {"type": "null"}]}
_MAYBE_TEXT = {"oneOf": [{"type": "string"}, {"type": "null"}]}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50},
    "description": "At most this many per page.",
}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": "string"}, "description": description}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def view_paths(
    operation: Callable[..., dict[str, Any]],
    json: Callable[[dict[str, Any], str], dict[str, Any]],
    errors: Callable[..., dict[str, Any]],
    device: dict[str, Any],
    secured: dict[str, Any],
) -> dict[str, Any]:
    """The paths, built with :mod:`amqp_queue.openapi`'s helpers."""
    cursor = "The previous page's next."
    return {
        "/confirmations": {
            "get": operation(
                "List every command awaiting confirmation across the fleet, oldest first",
                {"200": json(_ref("Inbox"), "A page of the inbox."), **errors(400, 401, 503)},
                parameters=[
                    _query("after", cursor),
                    _query("device_prefix", "Only devices whose id starts with this."),
                    _query("command_type", "Only commands of this type."),
                    _LIMIT,
                ],
                **secured,
            )
        },
        "/devices": {
            "get": operation(
                "List the devices with open commands, by id, counted by status",
                {"200": json(_ref("DeviceList"), "A page of devices."), **errors(400, 401, 503)},
                parameters=[_query("after", cursor), _LIMIT],
                **secured,
            )
        },
        "/devices/{device_id}/history": {
            "get": operation(
                "List the device's commands of any status still held, newest first",
                {
                    "200": json(_ref("History"), "A page of the device's commands."),
                    **errors(400, 401, 503),
                },
                parameters=[device, _query("before", cursor), _LIMIT],
                **secured,
            )
        },
    }


def view_schemas() -> dict[str, Any]:
    """The schemas the paths (and ``GET /commands/{command_id}``) refer to."""
    payload = {
        "payload": {"type": "string"},
        "encoding": {"enum": ["utf-8", "base64"]},
        "payload_bytes": {"type": "integer", "minimum": 0},
    }
    return {
        "CommandRecord": {
            "type": "object",
            "description": "Everything held about one command; times are null until they "
            "happen. delivered_at is set once delivered, ended_at once delivered or ended.",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "status": {"enum": [status.value for status in CommandStatus]},
                "device_id": _ref("DeviceId"),
                "command_type": _MAYBE_TEXT,
                **payload,
                "requires_confirmation": {"type": "boolean"},
                "confirmed": {"type": "boolean"},
                "rollout_id": _MAYBE_TEXT,
                "created_at": _TIME,
                "expires_at": _TIME,
                "confirmed_at": _MAYBE_TIME,
                "published_at": _MAYBE_TIME,
                "delivered_at": _MAYBE_TIME,
                "ended_at": _MAYBE_TIME,
                "end_reason": {
                    "oneOf": [
                        {"enum": ["cancelled", "superseded", "expired", "rejected"]},
                        {"type": "null"},
                    ]
                },
                "enqueued_by": _MAYBE_TEXT,
                "confirmed_by": _MAYBE_TEXT,
                "cancelled_by": _MAYBE_TEXT,
            },
        },
        "InboxEntry": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "device_id": _ref("DeviceId"),
                "command_type": {"type": "string"},
                "payload_preview": {
                    "type": "string",
                    "description": f"The first {PREVIEW_BYTES} bytes, in encoding.",
                },
                "encoding": {"enum": ["utf-8", "base64"]},
                "payload_bytes": {"type": "integer", "minimum": 0},
                "enqueued_by": _MAYBE_TEXT,
                "created_at": _TIME,
                "expires_at": _TIME,
                "age_seconds": {"type": "number"},
                "time_left_seconds": {"type": "number"},
            },
        },
        "Inbox": {
            "type": "object",
            "properties": {
                "commands": {"type": "array", "items": _ref("InboxEntry")},
                "next": _MAYBE_TEXT,
            },
        },
        "DeviceList": {
            "type": "object",
            "properties": {
                "devices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "device_id": _ref("DeviceId"),
                            "open": {"type": "integer"},
                            "counts": {
                                "type": "object",
                                "properties": {
                                    "pending": {"type": "integer"},
                                    "awaiting_confirmation": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
                "next": _MAYBE_TEXT,
            },
        },
        "History": {
            "type": "object",
            "properties": {
                "device_id": _ref("DeviceId"),
                "commands": {"type": "array", "items": _ref("CommandRecord")},
                "next": _MAYBE_TEXT,
            },
        },
    }
