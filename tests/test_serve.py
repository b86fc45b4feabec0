"""``amqp-queue serve`` as a process: it serves, and stops cleanly on SIGTERM losing nothing."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx

from amqp_queue import CommandStatus, SqlStore
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

TOKEN = "serve-test-token-abcdef"


async def _read_url(stderr: asyncio.StreamReader, log: list[str]) -> str:
    while line := (await stderr.readline()).decode():
        log.append(line)
        if found := re.search(r"serving the operator API on (http://\S+)", line):
            return found.group(1)
    raise AssertionError("serve exited before serving:\n" + "".join(log))


async def _keep_reading(stderr: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stderr.readline():
        log.append(line.decode())


async def test_serve_stops_on_sigterm_and_keeps_every_enqueue_it_accepted(tmp_path: Path) -> None:
    exchange = unique("test.serve.")
    state_url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    env = {
        **os.environ,
        "AMQP_URL": AMQP_URL,
        "AMQP_QUEUE_STATE_URL": state_url,
        "AMQP_QUEUE_EXCHANGE": exchange,
        "AMQP_QUEUE_BIND": "127.0.0.1:0",
        "AMQP_QUEUE_TOKENS": f"ci:{TOKEN}",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amqp_queue.cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(30):
            url = await _read_url(process.stderr, log)
        reader = asyncio.create_task(_keep_reading(process.stderr, log))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as client:
            assert (await client.get("/healthz")).json()["status"] == "ok"

            async def enqueue(number: int) -> httpx.Response:
                body = {"payload": f"cmd {number}", "ttl": 600}
                return await client.post(f"/devices/dev-{number % 3}/commands", json=body)

            first = await enqueue(0)
            burst = [asyncio.create_task(enqueue(number)) for number in range(1, 40)]
            # Stopped while the burst is under way: once the first of it is answered.
            await asyncio.wait(burst, return_when=asyncio.FIRST_COMPLETED)
            process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*burst, return_exceptions=True)
        async with asyncio.timeout(30):
            code = await process.wait()
        await reader
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await delete_namespace(exchange, ["dev-0", "dev-1", "dev-2"])

    accepted = [first, *(a for a in answers if isinstance(a, httpx.Response))]
    assert code == 0, "".join(log)
    # Requests the server had not started reading when it stopped fail on the client's side
    # (never a 5xx); every request it answered was accepted and is durable.
    assert all(isinstance(a, httpx.Response | httpx.TransportError) for a in answers)
    assert all(response.status_code == 201 for response in accepted)
    assert any("SIGTERM received" in line for line in log)
    assert not any(TOKEN in line for line in log)
    async with await SqlStore.connect(state_url) as state:
        for response in accepted:
            assert await state.get_status(response.json()["id"]) == CommandStatus.PENDING


async def test_serve_refuses_a_malformed_token_list_without_echoing_it() -> None:
    env = {**os.environ, "AMQP_QUEUE_TOKENS": "ops:fine,brokenentry-with-secret"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amqp_queue.cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()

    assert process.returncode == 2
    assert b"token entry 2 is not of the form name:token" in stderr
    assert b"secret" not in stderr
    assert b"fine" not in stderr


async def test_serve_refuses_an_unknown_role_without_echoing_the_token() -> None:
    env = {**os.environ, "AMQP_QUEUE_TOKENS": "ops:fine:viewer,ci:hidden-secret:admin"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "amqp_queue.cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, stderr = await process.communicate()

    assert process.returncode == 2
    assert b"token entry 2 (name 'ci') ends in an unknown role" in stderr
    assert b"viewer, operator, approver" in stderr
    assert b"secret" not in stderr
    assert b"admin" not in stderr
