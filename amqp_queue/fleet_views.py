"""The operator API's fleet-wide views: the confirmation inbox, the devices with open
commands, a device's history, and the whole record of one command (the console's pages).

Lists are paged by an opaque cursor (``next`` in an answer, ``after`` or ``before`` in the
next request): keyset pagination over the store's indexes, so a page deep in a large table
costs what the first one does.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from amqp_queue import command_io
from amqp_queue.state import rules
from amqp_queue.state.errors import InvalidInput
from amqp_queue.state.model import CommandRecord, Position
from amqp_queue.state.validation import is_command_id
from amqp_queue.store import RabbitMQStore

DEFAULT_PAGE = 50
MAX_PAGE = 500
PREVIEW_BYTES = 64
"""How much of a payload the inbox shows; the command view shows all of it."""


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def record_json(record: CommandRecord, now: datetime) -> dict[str, Any]:
    """The whole record of a command as JSON (``GET /commands/{id}``, a device's history)."""
    return {
        "id": record.id,
        "status": rules.status_of(record, now).value,
        "device_id": record.device_id,
        "command_type": record.command_type,
        **command_io.encode_payload(record.payload),
        "payload_bytes": len(record.payload),
        "requires_confirmation": record.requires_confirmation,
        "confirmed": record.confirmed,
        "rollout_id": record.rollout_id,
        "created_at": _time(record.created_at),
        "expires_at": _time(record.expires_at),
        "confirmed_at": _time(record.confirmed_at),
        "published_at": _time(record.published_at),
        "delivered_at": _time(record.ended_at if record.delivered else None),
        "ended_at": _time(record.ended_at),
        "end_reason": None if record.end_reason is None else record.end_reason.value,
        "enqueued_by": record.enqueued_by,
        "confirmed_by": record.confirmed_by,
        "cancelled_by": record.cancelled_by,
        # Once the gateway reported how it went (rule 9): status, result or reason, when.
        **(
            {"outcome": command_io.outcome_json(outcome)}
            if (outcome := record.to_outcome()) is not None
            else {}
        ),
    }


def inbox_json(record: CommandRecord, now: datetime) -> dict[str, Any]:
    """A command awaiting confirmation as the inbox lists it: a payload preview, age and
    time left in seconds."""
    preview = command_io.encode_payload(record.payload[:PREVIEW_BYTES])
    return {
        "id": record.id,
        "device_id": record.device_id,
        "command_type": record.command_type,
        "payload_preview": preview["payload"],
        "encoding": preview["encoding"],
        "payload_bytes": len(record.payload),
        "enqueued_by": record.enqueued_by,
        "created_at": _time(record.created_at),
        "expires_at": _time(record.expires_at),
        "age_seconds": round((now - record.created_at).total_seconds(), 3),
        "time_left_seconds": round(max(0.0, (record.expires_at - now).total_seconds()), 3),
    }


def encode_cursor(record: CommandRecord) -> str:
    """Where a page ends, opaque to the caller."""
    text = f"{record.created_at.isoformat()}|{record.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, name: str) -> Position:
    """A cursor from :func:`encode_cursor`.

    Raises:
        InvalidInput: it is not one.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, command_id = text.split("|")
        created = datetime.fromisoformat(moment)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(f"{name} is not a cursor this API gave out") from None
    if created.tzinfo is None or not is_command_id(command_id):
        raise InvalidInput(f"{name} is not a cursor this API gave out")
    return created, command_id


def page_size(request: Request) -> int:
    """The ``limit`` query parameter: 1 to :data:`MAX_PAGE`, :data:`DEFAULT_PAGE` if absent.

    Raises:
        InvalidInput: anything else.
    """
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_PAGE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_PAGE}, not {text!r}")
    return int(text)


class FleetViews:
    """The fleet-wide endpoints of :class:`~amqp_queue.api.OperatorApi` (a mixin)."""

    _store: RabbitMQStore

    async def inbox(self, request: Request, operator: str) -> Response:
        """``GET /confirmations``: every command awaiting confirmation, oldest first."""
        limit = page_size(request)
        query = request.query_params
        after = query.get("after")
        found = await self._store.awaiting_confirmation(
            after=None if after is None else decode_cursor(after, "after"),
            limit=limit + 1,
            device_prefix=query.get("device_prefix") or None,
            command_type=query.get("command_type") or None,
        )
        now = self._store.state.clock()
        page = found[:limit]
        more = len(found) > limit
        return JSONResponse(
            {
                "commands": [inbox_json(record, now) for record in page],
                "next": encode_cursor(page[-1]) if more else None,
            }
        )

    async def devices(self, request: Request, operator: str) -> Response:
        """``GET /devices``: devices with open commands, by id, with counts by status."""
        limit = page_size(request)
        after = request.query_params.get("after") or None
        found = await self._store.devices_with_open(after=after, limit=limit + 1)
        page = found[:limit]
        return JSONResponse(
            {
                "devices": [
                    {
                        "device_id": summary.device_id,
                        "open": summary.pending + summary.awaiting_confirmation,
                        "counts": {
                            "pending": summary.pending,
                            "awaiting_confirmation": summary.awaiting_confirmation,
                        },
                    }
                    for summary in page
                ],
                "next": page[-1].device_id if len(found) > limit else None,
            }
        )

    async def history(self, request: Request, operator: str) -> Response:
        """``GET /devices/{device_id}/history``: the device's commands still held, newest
        first."""
        device = request.path_params["device_id"]
        limit = page_size(request)
        before = request.query_params.get("before")
        found = await self._store.device_history(
            device,
            before=None if before is None else decode_cursor(before, "before"),
            limit=limit + 1,
        )
        now = self._store.state.clock()
        page = found[:limit]
        return JSONResponse(
            {
                "device_id": device,
                "commands": [record_json(record, now) for record in page],
                "next": encode_cursor(page[-1]) if len(found) > limit else None,
            }
        )
