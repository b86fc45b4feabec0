"""The demo: a fleet of simulated devices over the real RabbitMQ, with the SQLite default.

Devices sleep and wake; while they sleep, short-lived commands expire and repeated
set-points replace each other (latest wins); unlock commands wait until an operator confirms
them through the HTTP API, which runs in-process on a free port and is called over real
HTTP; devices drain on reconnect and consume while online. At the end every device comes
online once more, and the judge (:mod:`amqp_queue.demo.ledger`) compares what the devices
actually received with what had to arrive: the run fails unless nothing was lost and
nothing arrived twice.

Each run uses its own exchange (so its own device queues) and deletes them at the end.
Run it with ``make demo``, ``amqp-queue demo`` or ``python -m amqp_queue.demo``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from amqp_queue.auth import Tokens
from amqp_queue.config import RabbitMQConfig
from amqp_queue.demo.fleet import COMMAND_TYPES, LONG_TTL, LONGEST_PAYLOAD, Device, Producer
from amqp_queue.demo.ledger import Ledger, Summary, judge
from amqp_queue.demo.operator import HttpOperator
from amqp_queue.demo.report import progress, table
from amqp_queue.errors import BROKER_FAILURES
from amqp_queue.service import Backends, running_api
from amqp_queue.settings import DEFAULT_AMQP_URL, DEFAULT_CONNECT_TIMEOUT, Settings
from amqp_queue.state.errors import QueueError
from amqp_queue.state.model import CommandStatus
from amqp_queue.store import RabbitMQStore

logger = logging.getLogger("amqp_queue.demo")

__all__ = ["DemoOptions", "Summary", "run_demo", "table"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """How big and how long the demo is, and where it runs.

    Attributes:
        devices: simulated devices.
        seconds: how long the producer sends commands; the run takes a few seconds more.
        seed: makes the random choices repeatable.
        amqp_url: the broker.
        state_url: the state index; a temporary SQLite file by default.
        connect_timeout: seconds to keep trying to reach the broker.
        hold: seconds an unlock waits before the operator confirms it.
        rabbitmq: the store's configuration (queue type, timings, limits); its exchange is
            replaced by one of the run's own.
    """

    devices: int = 50
    seconds: float = 12.0
    seed: int | None = None
    amqp_url: str = DEFAULT_AMQP_URL
    state_url: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    hold: float = 0.3
    rabbitmq: RabbitMQConfig = field(default_factory=RabbitMQConfig)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("the demo needs at least one device")
        if not self.seconds > 0:
            raise ValueError("seconds must be positive")
        limits = self.rabbitmq.limits
        # What its own commands need, refused before it connects rather than mid-run.
        longest_name = len(_device_name(self.devices - 1))
        longest_type = max(map(len, COMMAND_TYPES))
        needs = [
            ("--max-ttl", limits.max_ttl.total_seconds(), LONG_TTL),
            ("--max-payload-bytes", limits.max_payload_bytes, LONGEST_PAYLOAD),
            ("--max-device-id-length", limits.max_device_id_length, longest_name),
            ("--max-command-type-length", limits.max_command_type_length, longest_type),
        ]
        for flag, given, needed in needs:
            if given < needed:
                raise ValueError(f"the demo needs {flag} of at least {needed:g}, got {given:g}")


async def run_demo(options: DemoOptions, out: TextIO, err: TextIO) -> Summary:
    """Runs the demo, writing what it does to ``out`` and its progress to ``err``.

    Raises:
        QueueError: the broker or the state index could not be used.
    """
    token = secrets.token_urlsafe(24)
    exchange = f"demo.{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="amqp-queue-demo-") as directory:
        state_url = options.state_url or f"sqlite+aiosqlite:///{Path(directory) / 'commands.db'}"
        settings = Settings(
            amqp_url=options.amqp_url,
            state_url=state_url,
            rabbitmq=replace(options.rabbitmq, exchange=exchange),
            tokens=Tokens({"demo-operator": token}),
            connect_timeout=options.connect_timeout,
        )
        where = state_url if options.state_url else "SQLite (temporary file)"
        out.write(
            f"amqp-queue demo: {options.devices} devices for {options.seconds:g}s on exchange "
            f"{exchange} ({settings.rabbitmq.queue_type.value} queues), state {where}\n"
        )
        out.flush()
        async with await Backends.open(settings, wait_for_broker=True) as backends:
            try:
                async with running_api(backends) as base_url:
                    # The run's own token, on loopback, gone when the run ends: shown so the
                    # console can be watched while the simulated operator approves.
                    out.write(f"console: {base_url}/ (sign in with the token {token})\n")
                    out.flush()
                    return await _simulate(backends.store, base_url, token, options, err)
            except* QueueError as errors:
                # A limit met mid-run (or the broker lost) ends the run with its own error,
                # not a group of every device's.
                raise errors.exceptions[0] from None
            finally:
                await _delete_queues(backends, _device_names(options))


async def _simulate(
    store: RabbitMQStore, base_url: str, token: str, options: DemoOptions, err: TextIO
) -> Summary:
    started = time.monotonic()
    ledger = Ledger()
    rng = random.Random(options.seed)
    names = _device_names(options)
    operator = HttpOperator(base_url, token, ledger, hold=options.hold)
    devices = [
        Device(name, store, ledger, random.Random(rng.random()), (0.4, 1.2)) for name in names
    ]
    producer = Producer(store, names, ledger, operator, rng)
    stop_devices, stop_operator = asyncio.Event(), asyncio.Event()

    def status() -> str:
        return (
            f"enqueued {len(ledger.issued)}  delivered {ledger.distinct_received}  "
            f"confirmed {len(ledger.confirmed)}"
        )

    async with asyncio.TaskGroup() as group:
        for device in devices:
            group.create_task(device.live(stop_devices))
        watching = group.create_task(operator.run(stop_operator))
        bar = group.create_task(progress(options.seconds, status, err))
        await producer.run(options.seconds, interval=min(0.05, 0.6 / options.devices))
        await bar
        err.write("settling: confirming what waits, then every device online once more\n")
        stop_operator.set()
        await watching
        await operator.settle()
        stop_devices.set()
    # Every device comes online at the end and takes what is still ready for it.
    await asyncio.gather(*(device.drain() for device in devices))
    await operator.request("POST", "/cleanup")
    statuses = await _statuses(store, list(ledger.issued))
    return judge(ledger, statuses, devices=options.devices, seconds=time.monotonic() - started)


async def _statuses(store: RabbitMQStore, command_ids: list[str]) -> dict[str, CommandStatus]:
    statuses: dict[str, CommandStatus] = {}
    for start in range(0, len(command_ids), 200):
        chunk = command_ids[start : start + 200]
        found = await asyncio.gather(*(store.get_status(command_id) for command_id in chunk))
        statuses.update(zip(chunk, found, strict=True))
    return statuses


def _device_names(options: DemoOptions) -> list[str]:
    return [_device_name(number) for number in range(options.devices)]


def _device_name(number: int) -> str:
    return f"demo-{number:03d}"


async def _delete_queues(backends: Backends, devices: list[str]) -> None:
    """Deletes the run's device queues and exchange, so runs do not pile up on the broker."""
    try:
        channel = await backends.connection.channel()
        for device in devices:
            await channel.queue_delete(backends.store.config.queue_name(device))
        await channel.exchange_delete(backends.store.config.exchange)
        await channel.close()
    except BROKER_FAILURES as exc:
        logger.warning("could not delete the demo's queues: %s", exc)
