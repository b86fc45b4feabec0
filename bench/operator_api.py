"""The operator API under load: ``amqp-queue serve`` over HTTP, against the library's calls.

The service runs as its users run it: ``amqp-queue serve`` in a process of its own (SQLite
state in a temporary file, its default ``info`` log with one access line per request going
to a file). Keep-alive clients (:mod:`bench.http_client`) send each request mode at
concurrency 1 and 50: ``POST /devices/{id}/commands`` in each mode (plain, latest, confirm)
and ``GET /devices/{id}/commands`` of a device holding 10 pending commands; requests/s and
each request's latency (p99 reported). In the same run, in this process, a store on its
own SQLite file makes the same calls (``enqueue``, ``enqueue_or_update``,
``enqueue_with_confirmation``, ``get_pending``) at the same concurrency: the rate the API
is held against.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from amqp_queue import RabbitMQConfig, RabbitMQStore
from bench.harness import Context, Target, percentile, rate
from bench.http_client import KeepAliveClient
from bench.services import (
    AMQP_URL,
    PAYLOAD,
    TTL,
    delete_namespace,
    device_ids,
    rabbitmq_store,
    sqlite_url,
    temp_dir,
)
from bench.services import unique as unique_name

GROUP = "Operator API over HTTP (amqp-queue serve, keep-alive clients)"
TOKEN = "bench-operator-token-0123456789abcdef"
OPERATIONS = ("plain", "latest", "confirm", "list")
_LIST_DEVICE = "dev-list"
_LISTED = 10
_TYPES = 4
_START_TIMEOUT = 30.0

Call = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Served:
    host: str
    port: int
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serving(
    directory: Path, exchange: str, state: str | None = None
) -> AsyncIterator[Served]:
    """``amqp-queue serve`` in a process of its own, until SIGTERM; its state a SQLite file
    in ``directory``, or the ``state`` URL given."""
    port = _free_port()
    log = directory / "serve.log"
    env = {
        **os.environ,
        "AMQP_URL": AMQP_URL,
        "AMQP_QUEUE_STATE_URL": state or sqlite_url(directory),
        "AMQP_QUEUE_EXCHANGE": exchange,
        "AMQP_QUEUE_TOKENS": f"bench:{TOKEN}",
        "AMQP_QUEUE_BIND": f"127.0.0.1:{port}",
    }
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "amqp_queue.cli",
            "serve",
            env=env,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await _until_healthy(process, port, log)
        yield Served("127.0.0.1", port, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()


async def _until_healthy(process: asyncio.subprocess.Process, port: int, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            raise RuntimeError(f"amqp-queue serve exited: {output[-2000:]}")
        try:
            async with KeepAliveClient("127.0.0.1", port, TOKEN) as client:
                status, _ = await client.request("GET", "/healthz")
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"amqp-queue serve not healthy in {_START_TIMEOUT:g} s")


def _bodies(operation: str, devices: list[str]) -> Iterator[tuple[str, str, bytes | None]]:
    """The requests of ``operation``: method, path and body, endlessly."""
    if operation == "list":
        while True:
            yield "GET", f"/devices/{_LIST_DEVICE}/commands", None
    payload = PAYLOAD.hex()
    for index, device in enumerate(itertools.cycle(devices)):
        body: dict[str, object] = {"payload": payload, "ttl": TTL, "mode": operation}
        if operation != "plain":
            body["command_type"] = f"type-{index % _TYPES}"
        yield "POST", f"/devices/{device}/commands", json.dumps(body).encode()


async def _http(
    served: Served, operation: str, devices: list[str], count: int, workers: int
) -> list[float]:
    """Each request's seconds, ``count`` requests over ``workers`` keep-alive connections."""
    requests = zip(range(count), _bodies(operation, devices), strict=False)
    latencies: list[float] = []
    expected = 200 if operation == "list" else 201

    async def worker() -> None:
        async with KeepAliveClient(served.host, served.port, TOKEN) as client:
            for _, (method, path, body) in requests:
                started = time.perf_counter()
                status, answer = await client.request(method, path, body)
                latencies.append(time.perf_counter() - started)
                if status != expected:
                    raise RuntimeError(f"{method} {path} answered {status}: {answer[:300]!r}")

    await asyncio.gather(*(worker() for _ in range(min(workers, count))))
    return latencies


def _library_call(store: RabbitMQStore, operation: str, devices: list[str]) -> Call:
    targets = itertools.cycle(devices)
    payload = PAYLOAD.hex().encode()

    async def call(index: int) -> None:
        kind = f"type-{index % _TYPES}"
        if operation == "plain":
            await store.enqueue(next(targets), payload, TTL)
        elif operation == "latest":
            await store.enqueue_or_update(next(targets), kind, payload, TTL)
        elif operation == "confirm":
            await store.enqueue_with_confirmation(next(targets), kind, payload, TTL)
        else:
            await store.get_pending(_LIST_DEVICE)

    return call


async def _library(call: Call, count: int, workers: int) -> float:
    """Seconds for ``count`` calls over ``workers`` concurrent tasks."""
    work = iter(range(count))

    async def worker() -> None:
        for index in work:
            await call(index)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(workers, count))))
    return time.perf_counter() - started


async def _api_run(ctx: Context, devices: list[str], levels: tuple[int, ...]) -> None:
    results, count = ctx.results, ctx.sizes.api_requests
    exchange = unique_name("bench.api")
    try:
        with temp_dir() as directory:
            async with serving(directory, exchange) as served:
                await _http(served, "plain", [_LIST_DEVICE], _LISTED, 1)
                await _http(served, "plain", devices, len(devices), 1)  # queues declared
                for operation, workers in itertools.product(OPERATIONS, levels):
                    started = time.perf_counter()
                    latencies = await _http(served, operation, devices, count, workers)
                    seconds = time.perf_counter() - started
                    what = _what(operation)
                    results.record(
                        f"api.{operation}.c{workers}",
                        rate(count, seconds),
                        group=GROUP,
                        label=f"HTTP {what}, concurrency {workers}",
                        unit="req/s",
                    )
                    results.record(
                        f"api.{operation}.c{workers}.p99",
                        percentile(latencies, 0.99) * 1e3,
                        group=GROUP,
                        label=f"HTTP {what}, concurrency {workers}: p99 of {count:,}",
                        unit="ms",
                        better="lower",
                    )
    finally:
        queues = RabbitMQConfig(exchange=exchange)
        await delete_namespace(exchange, (queues.queue_name(d) for d in [*devices, _LIST_DEVICE]))


async def _library_run(ctx: Context, devices: list[str], levels: tuple[int, ...]) -> None:
    results, count = ctx.results, ctx.sizes.api_requests
    async with rabbitmq_store() as store:
        for _ in range(_LISTED):
            await store.enqueue(_LIST_DEVICE, PAYLOAD, TTL)
        for device in devices:
            await store.ensure_queue(device)
        for operation, workers in itertools.product(OPERATIONS, levels):
            seconds = await _library(_library_call(store, operation, devices), count, workers)
            results.record(
                f"lib.{operation}.c{workers}",
                rate(count, seconds),
                group=GROUP,
                label=f"library {_LIBRARY_CALLS[operation]}, concurrency {workers}",
                unit="calls/s",
            )


_LIBRARY_CALLS = {
    "plain": "enqueue",
    "latest": "enqueue_or_update",
    "confirm": "enqueue_with_confirmation",
    "list": f"get_pending ({_LISTED} pending)",
}


def _what(operation: str) -> str:
    if operation == "list":
        return f"GET /devices/{{id}}/commands ({_LISTED} pending)"
    return f"POST /devices/{{id}}/commands mode={operation}"


async def bench_api(ctx: Context) -> None:
    devices = device_ids(ctx.sizes.devices)
    levels = (1, ctx.sizes.api_concurrency)
    for _ in range(ctx.sizes.runs):
        await _library_run(ctx, devices, levels)
        await _api_run(ctx, devices, levels)
    for operation, workers in itertools.product(OPERATIONS, levels):
        ctx.results.ratio(
            f"API {operation}, concurrency {workers} / library call, same concurrency",
            f"api.{operation}.c{workers}",
            f"lib.{operation}.c{workers}",
            Target(0.5) if workers > 1 else None,
        )
    ctx.results.note(
        "Operator API: `amqp-queue serve` runs in a process of its own with its default info "
        "log (an access line and an audit line per request, to a file); the clients and the "
        "library's store share the benchmark's process."
    )
