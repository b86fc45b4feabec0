"""Hostile input against the operator API over real HTTP (uvicorn on a socket).

Bad device ids, command types, payloads, TTLs, malformed JSON, oversized bodies and missing or
wrong tokens: always a 4xx with a JSON ``error`` and a ``detail`` that says what is wrong,
never a 500, and nothing written to the state or the broker.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import example, given
from hypothesis import strategies as st

from tests.api_support import TOKEN, Api, running
from tests.backends import commands_held
from tests.properties.broker_view import BrokerView, queues_named_with_prefix
from tests.properties.hostile import hostile_command_types, hostile_device_ids, hostile_ttls
from tests.properties.runner import LoopRunner, property_settings

BODY_LIMIT = 64 * 1024  # what tests.api_support configures
VALID = {"payload": "reboot", "ttl": 60}

# Anything JSON can carry that is not the string a field wants.
json_non_strings = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
lone_surrogates = st.sampled_from(["\ud800", "a\udfff", "\udc80x", "ok\ud83d"])


def _json_safe(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _path_safe(value: object) -> bool:
    return isinstance(value, str) and not any("\ud800" <= c <= "\udfff" for c in value)


class ApiTarget:
    def __init__(self, runner: LoopRunner, api: Api, broker: BrokerView) -> None:
        self.runner = runner
        self.api = api
        self.broker = broker

    def rejects(
        self,
        method: str,
        path: str,
        *,
        status: int | None = None,
        device: str = "dev-1",
        **request: Any,
    ) -> None:
        """The request is answered with a 4xx (``status`` if given) and writes nothing."""

        async def attempt() -> None:
            response = await self.api.client.request(method, path, **request)
            assert 400 <= response.status_code < 500, (response.status_code, response.text)
            if status is not None:
                assert response.status_code == status, response.text
            answer = response.json()
            assert answer["error"], answer
            assert answer["detail"], answer
            assert await commands_held(self.api.backends.store) == 0
            name = self.api.backends.store.config.queue_name(device)
            assert not await self.broker.queue_exists(name)

        self.runner.run(attempt())


@contextmanager
def served(tmp_path: Path) -> Iterator[ApiTarget]:
    with LoopRunner() as runner:
        api = runner.enter(running(tmp_path))
        broker = runner.enter(BrokerView.open())
        yield ApiTarget(runner, api, broker)
        assert queues_named_with_prefix(api.backends.store.config.queue_prefix) == []


def _enqueue_path(device: str) -> str:
    return f"/devices/{quote(device, safe='')}/commands"


def test_hostile_device_ids_in_the_path_are_a_4xx_and_write_nothing(tmp_path: Path) -> None:
    with served(tmp_path) as target:

        @given(device=hostile_device_ids().filter(_path_safe))
        @property_settings(15)
        def check(device: Any) -> None:
            path = _enqueue_path(device)
            target.rejects("POST", path, json=VALID, device=device)
            target.rejects("GET", path, device=device)

        check()


def _with(field: str, value: object, **extra: object) -> dict[str, object]:
    return {**VALID, **extra, field: value}


hostile_bodies = st.one_of(
    st.builds(
        _with,
        st.just("command_type"),
        st.one_of(hostile_command_types().filter(_json_safe), json_non_strings),
        mode=st.sampled_from(["latest", "confirm"]),
    ),
    st.builds(lambda: {**VALID, "mode": "latest"}),  # a typed mode without a type
    st.builds(_with, st.just("payload"), st.one_of(json_non_strings, lone_surrogates)),
    st.builds(
        _with,
        st.just("payload"),
        st.text(min_size=1, max_size=20).filter(lambda text: len(text) % 4 == 1),
        encoding=st.just("base64"),
    ),
    st.builds(_with, st.just("ttl"), hostile_ttls().filter(_json_safe)),
    st.builds(_with, st.just("mode"), st.one_of(st.text(max_size=10), json_non_strings)),
    st.builds(_with, st.just("encoding"), st.one_of(st.text(max_size=10), json_non_strings)),
    st.builds(_with, st.text(min_size=1, max_size=10).filter(lambda k: k not in VALID), st.just(1)),
    st.sampled_from([{"ttl": 60}, {"payload": "x"}, {}]),
).filter(lambda body: body.get("mode") not in ("plain", None) or "command_type" not in body)


def test_hostile_enqueue_fields_are_a_400_that_says_what_is_wrong(tmp_path: Path) -> None:
    with served(tmp_path) as target:

        @given(body=hostile_bodies)
        @example(body={"payload": "\ud800", "ttl": 60})
        @example(body={"payload": "x", "ttl": 10**400})
        @example(body={"payload": "x", "ttl": 1e-9})
        @property_settings(40)
        def check(body: dict[str, object]) -> None:
            if body.get("mode") == "plain" and body.get("encoding") in (None, "utf-8"):
                return  # only the mode field was "hostile", and it named a real mode
            content = json.dumps(body).encode()
            target.rejects("POST", _enqueue_path("dev-1"), status=400, content=content)

        check()


malformed = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=50).map(str.encode),
    st.sampled_from(
        [b"", b"{", b'{"payload": "x", "ttl": 60', b"[]", b"null", b"42", b'"x"', b"\xff\xfe"]
    ),
    st.integers(100, 20_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(100, 20_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
)


def test_malformed_json_bodies_are_a_4xx_never_a_500(tmp_path: Path) -> None:
    with served(tmp_path) as target:

        @given(body=malformed)
        @property_settings(25)
        def check(body: bytes) -> None:
            headers = {"content-type": "application/json"}
            target.rejects("POST", _enqueue_path("dev-1"), content=body, headers=headers)

        check()


def test_oversized_bodies_are_a_413_declared_or_streamed(tmp_path: Path) -> None:
    with served(tmp_path) as target:

        @given(size=st.integers(BODY_LIMIT + 1, BODY_LIMIT * 4), streamed=st.booleans())
        @property_settings(8)
        def check(size: int, streamed: bool) -> None:
            body = json.dumps({"payload": "x" * size, "ttl": 60}).encode()

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(body), 8192):
                    yield body[start : start + 8192]

            content: Any = chunks() if streamed else body
            target.rejects("POST", _enqueue_path("dev-1"), status=413, content=content)

        check()


PROTECTED = [
    ("POST", "/devices/dev-1/commands"),
    ("GET", "/devices/dev-1/commands"),
    ("GET", "/devices/dev-1/confirmations"),
    ("GET", "/commands/00000000-0000-4000-8000-000000000000"),
    ("POST", "/commands/00000000-0000-4000-8000-000000000000/confirm"),
    ("POST", "/commands/00000000-0000-4000-8000-000000000000/cancel"),
    ("POST", "/cleanup"),
]
# HTTP header values: Latin-1, no surrounding whitespace (the client refuses to send those).
latin1_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
).map(str.strip)
bad_authorizations = st.one_of(
    st.none(),
    latin1_text,
    latin1_text.map(lambda token: f"Bearer {token}".strip()).filter(lambda h: TOKEN not in h),
    st.sampled_from(
        [
            "Bearer",
            f"Basic {TOKEN}",
            f"Token {TOKEN}",
            f"Bearer {TOKEN.upper()}",
            f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN}x",
            f"Bearer x{TOKEN}",
            f"Bearer{TOKEN}",
            f"Bearer {'A' * 10_000}",
        ]
    ),
)


def test_missing_or_wrong_tokens_are_a_401_on_every_protected_endpoint(tmp_path: Path) -> None:
    with served(tmp_path) as target:

        @given(authorization=bad_authorizations, endpoint=st.sampled_from(PROTECTED))
        @property_settings(40)
        def check(authorization: str | None, endpoint: tuple[str, str]) -> None:
            method, path = endpoint
            # The client sends the good token by default: replace or remove the header.
            headers = {} if authorization is None else {"Authorization": _latin1(authorization)}
            target.runner.run(_without_default_auth(target.api))
            try:
                target.rejects(method, path, status=401, json=VALID, headers=headers)
            finally:
                target.api.client.headers["Authorization"] = f"Bearer {TOKEN}"

        check()


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


async def _without_default_auth(api: Api) -> None:
    api.client.headers.pop("Authorization", None)


def _segment(text: str) -> str:
    """``text`` as one path segment. A segment of only "." or ".." is a dot-segment that an
    HTTP client removes from the path (RFC 3986, 5.2.4), so ``/commands/./confirm`` went out as
    ``/commands/confirm``: its dots are percent-encoded, as the server still gets them."""
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def test_hostile_command_ids_in_the_path_are_a_404(tmp_path: Path) -> None:
    with served(tmp_path) as target:

        @given(
            command_id=st.text(min_size=1, max_size=300).filter(_path_safe),
            action=st.sampled_from([("GET", ""), ("POST", "/confirm"), ("POST", "/cancel")]),
        )
        @example(command_id="'; DROP TABLE command_queue;--", action=("POST", "/cancel"))
        @example(command_id=".", action=("POST", "/confirm"))
        @example(command_id="..", action=("GET", ""))
        @property_settings(20)
        def check(command_id: str, action: tuple[str, str]) -> None:
            method, suffix = action
            path = f"/commands/{_segment(command_id)}{suffix}"
            target.rejects(method, path, status=404)

        check()
