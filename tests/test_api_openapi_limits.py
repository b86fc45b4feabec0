"""The limits in ``/openapi.json`` are the store's :class:`Limits`, and its patterns accept
exactly what validation accepts (a client that validates against the document is never
refused for something the document allowed, nor kept from sending what the API takes)."""

from __future__ import annotations

import base64
import math
import re
import string
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from amqp_queue import InvalidInput, Limits
from amqp_queue.command_io import decode_payload
from amqp_queue.config import RabbitMQConfig
from amqp_queue.state.validation import validate_command_type, validate_device_id
from tests.api_support import Api, running
from tests.properties.hostile import hostile_command_types, hostile_device_ids
from tests.properties.runner import property_settings
from tests.support import unique

# Small enough that hypothesis reaches the length limits; odd to tell the numbers apart.
LIMITS = Limits(
    max_device_id_length=13,
    max_command_type_length=11,
    max_payload_bytes=1000,
    max_ttl=timedelta(hours=2, seconds=1),
)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config = RabbitMQConfig(exchange=unique("test.api."), limits=LIMITS)
    async with running(tmp_path, rabbitmq=config) as opened:
        yield opened


async def _document(api: Api) -> dict[str, Any]:
    response = await api.client.get("/openapi.json", headers={"Authorization": ""})
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in schema:
        return schema
    name = schema["$ref"].removeprefix("#/components/schemas/")
    resolved: dict[str, Any] = document["components"]["schemas"][name]
    return resolved


def _accepts(schema: dict[str, Any], text: str) -> bool:
    """Whether ``text`` meets a string schema's lengths and pattern.

    Python's ``re`` stands in for ECMA-262 here: the patterns use only what both share,
    and ``fullmatch`` keeps ``$`` from matching before a final newline.
    """
    return (
        schema.get("minLength", 0) <= len(text) <= schema.get("maxLength", math.inf)
        and re.fullmatch(schema.get("pattern", ".*"), text) is not None
    )


def _validates(validate: Callable[[object, Limits], str], text: str) -> bool:
    try:
        validate(text, LIMITS)
    except InvalidInput:
        return False
    return True


async def test_the_numbers_in_the_document_are_the_stores_limits(api: Api) -> None:
    document = await _document(api)
    schemas = document["components"]["schemas"]
    enqueue = schemas["EnqueueRequest"]
    sized = enqueue["allOf"][0]
    base64_payload = sized["then"]["properties"]["payload"]

    assert api.backends.store.limits == LIMITS
    assert schemas["DeviceId"]["maxLength"] == LIMITS.max_device_id_length
    assert schemas["DeviceId"]["minLength"] == 1
    assert schemas["CommandType"]["maxLength"] == LIMITS.max_command_type_length
    assert schemas["CommandType"]["minLength"] == 1
    assert enqueue["properties"]["ttl"]["maximum"] == LIMITS.max_ttl.total_seconds()
    assert enqueue["properties"]["ttl"]["exclusiveMinimum"] == 0
    assert sized["else"]["properties"]["payload"]["maxLength"] == LIMITS.max_payload_bytes
    # In characters, base64 can be bounded only to its group of 4 (3 bytes): the bound is
    # the largest payload's length; the API's byte count decides within that last group.
    largest = base64.b64encode(b"\xff" * LIMITS.max_payload_bytes).decode()
    next_group = base64.b64encode(b"\xff" * (LIMITS.max_payload_bytes + 3)).decode()
    assert base64_payload["maxLength"] == len(largest)
    assert _accepts(base64_payload, largest)
    assert not _accepts(base64_payload, next_group)


async def test_every_device_id_parameter_and_field_names_the_limited_schema(api: Api) -> None:
    document = await _document(api)
    parameters = [
        parameter
        for item in document["paths"].values()
        for operation in item.values()
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "device_id"
    ]
    schemas = document["components"]["schemas"]

    assert len(parameters) == 5  # enqueue, list, confirmations, retire, history
    device_id = {"$ref": "#/components/schemas/DeviceId"}
    assert all(parameter["schema"] == device_id for parameter in parameters)
    assert schemas["Command"]["properties"]["device_id"] == device_id
    assert schemas["CommandList"]["properties"]["device_id"] == device_id
    command_type = {"$ref": "#/components/schemas/CommandType"}
    assert {"type": "null"} in schemas["EnqueueRequest"]["properties"]["command_type"]["oneOf"]
    assert command_type in schemas["EnqueueRequest"]["properties"]["command_type"]["oneOf"]
    rollout = schemas["RolloutRequest"]["properties"]
    assert rollout["device_ids"]["items"] == device_id
    assert rollout["command_type"]["$ref"] == command_type["$ref"]


# Valid characters of both alphabets, with the ones each refuses and a few that look alike.
NAME_TEXT = st.text(
    alphabet=string.ascii_letters[:6] + "AMQamq" + string.digits[:3] + "_.:@-/ \n*é%",
    max_size=16,
)


async def test_the_device_id_pattern_accepts_what_validation_accepts(api: Api) -> None:
    schema = _resolve(await _document(api), {"$ref": "#/components/schemas/DeviceId"})

    @given(st.one_of(NAME_TEXT, hostile_device_ids().filter(lambda value: isinstance(value, str))))
    @example("gw-7")
    @example("a" * LIMITS.max_device_id_length)
    @example("a" * (LIMITS.max_device_id_length + 1))
    @example("AmQ.x")
    @example("amqx")
    @example("a..b")
    @example("gw/7")
    @example("gw-7\n")
    @property_settings(300)
    def check(text: Any) -> None:
        assert _accepts(schema, text) == _validates(validate_device_id, text), text

    check()


async def test_the_command_type_pattern_accepts_what_validation_accepts(api: Api) -> None:
    schema = _resolve(await _document(api), {"$ref": "#/components/schemas/CommandType"})

    @given(
        st.one_of(NAME_TEXT, hostile_command_types().filter(lambda value: isinstance(value, str)))
    )
    @example("setpoint")
    @example("ble/write:1")
    @example("a" * LIMITS.max_command_type_length)
    @example("a" * (LIMITS.max_command_type_length + 1))
    @example("-x")
    @example("x@y")
    @property_settings(300)
    def check(text: Any) -> None:
        assert _accepts(schema, text) == _validates(validate_command_type, text), text

    check()


async def test_the_base64_pattern_accepts_what_the_api_decodes(api: Api) -> None:
    document = await _document(api)
    pattern = document["components"]["schemas"]["EnqueueRequest"]["allOf"][0]["then"]
    schema = {"pattern": pattern["properties"]["payload"]["pattern"]}

    def decodes(text: str) -> bool:
        try:
            decode_payload(text, "base64")
        except InvalidInput:
            return False
        return True

    @given(
        st.one_of(
            st.binary(max_size=12).map(lambda raw: base64.b64encode(raw).decode()),
            st.text(alphabet="QUJD+/=\n -_*", max_size=12),
        )
    )
    @example("")
    @example("QQ")
    @example("QQ=")
    @example("QQ==")
    @example("QQ==QQ==")
    @example("Q===")
    @example("QUJD\n")
    @property_settings(300)
    def check(text: str) -> None:
        assert _accepts(schema, text) == decodes(text), text

    check()


async def test_an_enqueue_at_the_documented_limits_is_taken_and_beyond_them_refused(
    api: Api,
) -> None:
    most_seconds = LIMITS.max_ttl.total_seconds()
    payload = "x" * LIMITS.max_payload_bytes
    command_type = "t" * LIMITS.max_command_type_length
    at_limits = {
        "payload": payload,
        "ttl": most_seconds,
        "mode": "latest",
        "command_type": command_type,
    }
    device = "d" * LIMITS.max_device_id_length

    taken = await api.client.post(f"/devices/{device}/commands", json=at_limits)
    over = [
        await api.client.post(f"/devices/{device}x/commands", json=at_limits),
        await api.enqueue(device, **{**at_limits, "ttl": most_seconds + 1}),
        await api.enqueue(device, **{**at_limits, "payload": payload + "x"}),
        await api.enqueue(device, **{**at_limits, "command_type": command_type + "t"}),
    ]

    assert taken.status_code == 201, taken.text
    assert [(r.status_code, r.json()["error"]) for r in over] == [(400, "invalid_input")] * 4
    await api.backends.store.cancel_command(taken.json()["id"])
