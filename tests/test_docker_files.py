"""The Dockerfile and docker-compose.yml: what the sidecar's container is told and does.

No Docker engine is needed (scripts/check-deploy.sh lints both files with hadolint and
docker-compose): the settings are read from the files, and the healthcheck's own command is run
here against a real operator API.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from amqp_queue.auth import TokenConfigError, Tokens
from amqp_queue.settings import Settings
from tests.api_support import running
from tests.test_deploy_files import ROOT, compose_environment, compose_services, compose_text

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _dockerfile_env() -> dict[str, str]:
    """Every ``NAME=value`` of the ENV instructions (continued lines included)."""
    instructions = re.findall(r"^ENV (?:.*\\\n)*.*$", DOCKERFILE, re.MULTILINE)
    return dict(re.findall(r"\b([A-Z][A-Z0-9_]+)=(\S+)", " ".join(instructions)))


def _dockerfile_volume() -> str:
    found = re.search(r"^VOLUME (\[.+\])$", DOCKERFILE, re.MULTILINE)
    assert found, "the Dockerfile declares no VOLUME"
    (volume,) = json.loads(found.group(1))
    assert isinstance(volume, str)
    return volume


def _dockerfile_healthcheck() -> list[str]:
    found = re.search(r"^HEALTHCHECK (?:.*\\\n)*\s*CMD (\[.+\])$", DOCKERFILE, re.MULTILINE)
    assert found, "the Dockerfile has no exec-form HEALTHCHECK"
    command: list[str] = json.loads(found.group(1))
    return command


def _compose_healthcheck() -> list[str]:
    block = compose_services()["sidecar"].split("    healthcheck:\n", 1)[1]
    test = block.split("      test:\n", 1)[1]
    items = re.findall(r"^        - (.+)$", test, re.MULTILINE)
    return [json.loads(item) if item.startswith('"') else item for item in items]


def test_the_header_token_examples_are_in_the_form_serve_accepts() -> None:
    examples = re.findall(r"AMQP_QUEUE_TOKENS=(\S+)", compose_text() + DOCKERFILE)

    assert len(examples) == 2
    for example in examples:
        assert Tokens.parse(example).names == ["operator"]
    # What the header said before: a bare token, refused at start-up (serve exits 2).
    with pytest.raises(TokenConfigError, match="name:token"):
        Tokens.parse("<token>")


def test_compose_gives_the_sidecar_longer_to_stop_than_it_gives_in_flight_requests() -> None:
    (grace,) = re.findall(r"^    stop_grace_period: (\d+)s$", compose_services()["sidecar"], re.M)

    assert int(grace) > Settings().shutdown_timeout + 10  # and time to close the store
    assert "docker stop --time 45" in DOCKERFILE


def test_compose_sidecar_waits_only_for_the_services_it_uses() -> None:
    block = compose_services()["sidecar"].split("    depends_on:\n", 1)[1]
    waits_for = re.findall(r"^      ([a-z0-9_-]+):$", block.split("    healthcheck:", 1)[0], re.M)
    state = urlsplit(compose_environment("sidecar")["AMQP_QUEUE_STATE_URL"])
    broker = urlsplit(compose_environment("sidecar")["AMQP_URL"])

    assert state.scheme.startswith("postgresql")
    used = sorted(str(url.hostname) for url in (broker, state))
    assert sorted(waits_for) == used == ["postgres", "rabbitmq"]


def test_the_image_keeps_its_default_sqlite_state_on_a_volume() -> None:
    url = _dockerfile_env()["AMQP_QUEUE_STATE_URL"]
    volume = _dockerfile_volume()

    assert url.startswith("sqlite+aiosqlite:////")
    path = Path(url.removeprefix("sqlite+aiosqlite:///"))
    assert path.parent == Path(volume)
    # The unprivileged user the service runs as owns the volume's directory.
    assert re.search(rf"chown 10001:10001 {volume}$", DOCKERFILE, re.M)
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, re.M)


def test_compose_and_the_dockerfile_share_one_healthcheck_calling_healthz() -> None:
    command = _dockerfile_healthcheck()

    assert ["CMD", *command] == _compose_healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]


async def _check(port: int) -> int:
    """The healthcheck's command as the container runs it, in this Python, for this port."""
    _, _, code = _dockerfile_healthcheck()
    env = {**os.environ, "AMQP_QUEUE_BIND": f"0.0.0.0:{port}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 20)


async def test_the_healthcheck_passes_on_a_healthy_sidecar(tmp_path: Path) -> None:
    async with running(tmp_path) as api:
        assert (await api.client.get("/healthz")).status_code == 200
        port = urlsplit(api.url).port
        assert port is not None

        assert await _check(port) == 0


class _Unavailable(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b'{"status": "unavailable", "broker": "unreachable"}')

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _answering_503() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_the_healthcheck_fails_on_a_503_and_on_a_closed_port() -> None:
    with _answering_503() as port:
        assert await _check(port) != 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    assert await _check(closed) != 0
