"""Private RabbitMQ nodes for tests that stop or restart a broker (scripts/rabbit-node.sh).

The machine's broker is shared by every other test, so a trial that takes a broker down uses
a node of its own::

    async with private_broker() as broker:
        connection = await aio_pika.connect_robust(broker.amqp_url)
        await restart_app(broker.node, down_for=1.0)  # only this node's clients notice

A node takes a few seconds to start (see the README's Reliability section for figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support import unique

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbit-node.sh"
# AMQP ports are drawn from here and the distribution port is 20000 above, so both stay below
# the kernel's ephemeral range (32768 and up), where an outgoing connection could take them.
AMQP_PORTS = range(10_000, 12_700)
DIST_OFFSET = 20_000


class PrivateBrokerError(RuntimeError):
    """scripts/rabbit-node.sh failed; the message carries its output."""


@dataclass(frozen=True)
class PrivateBroker:
    name: str
    node: str
    """The Erlang node name, ``NAME@localhost``, as ``rabbitmqctl -n`` takes it."""
    amqp_url: str
    amqp_port: int


def _script(*args: str, timeout: float = 120.0, extra_conf: str = "") -> str:
    env = {**os.environ, "RABBIT_NODE_EXTRA_CONF": extra_conf}
    try:
        done = subprocess.run(
            [str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        raise PrivateBrokerError(f"rabbit-node.sh {' '.join(args)}: timed out") from error
    if done.returncode != 0:
        raise PrivateBrokerError(
            f"rabbit-node.sh {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout}{done.stderr}".rstrip()
        )
    return done.stdout


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A loopback port free for AMQP whose distribution twin (+20000) is free too."""
    candidates = random.sample(AMQP_PORTS, 200)
    for port in candidates:
        if _port_free(port) and _port_free(port + DIST_OFFSET):
            return port
    raise PrivateBrokerError(f"no free port pair in {AMQP_PORTS}")


def start_node(name: str, amqp_port: int, extra_conf: str = "") -> PrivateBroker:
    """Starts the node (blocking, a few seconds) and returns it once its app is up;
    ``extra_conf``: rabbitmq.conf lines of its own."""
    output = _script(
        "start", name, str(amqp_port), str(amqp_port + DIST_OFFSET), extra_conf=extra_conf
    )
    url = output.strip().splitlines()[-1]
    return PrivateBroker(name=name, node=f"{name}@localhost", amqp_url=url, amqp_port=amqp_port)


def remove_node(name: str) -> None:
    """Stops the node if it runs and deletes its directory."""
    _script("remove", name)


async def _start(name: str, extra_conf: str) -> PrivateBroker:
    # A probed port can be taken before the node binds it: one more try on other ports then.
    try:
        return await asyncio.to_thread(start_node, name, free_port_pair(), extra_conf)
    except PrivateBrokerError:
        await asyncio.to_thread(remove_node, name)
    return await asyncio.to_thread(start_node, name, free_port_pair(), extra_conf)


@asynccontextmanager
async def private_broker(
    name: str | None = None, *, extra_conf: str = ""
) -> AsyncIterator[PrivateBroker]:
    """A fresh private node on free loopback ports for the duration of the block; stopped and
    its directory removed afterwards, also when the block or the start fails. ``extra_conf``:
    rabbitmq.conf lines of its own (``channel_max = 12``)."""
    name = name or unique("amqpq-")
    try:
        yield await _start(name, extra_conf)
    except BaseException:
        # A failed cleanup must not hide the block's own error.
        with contextlib.suppress(PrivateBrokerError):
            await asyncio.to_thread(remove_node, name)
        raise
    await asyncio.to_thread(remove_node, name)


def _name_of(node: str) -> str:
    name, _, host = node.partition("@")
    if host not in ("", "localhost"):
        raise ValueError(f"{node!r} is not a private node (NAME@localhost)")
    return name


async def stop_app(node: str) -> None:
    """``rabbitmqctl -n node stop_app``: every client of that node loses its connection."""
    await asyncio.to_thread(_script, "stop_app", _name_of(node))


async def start_app(node: str) -> None:
    """``rabbitmqctl -n node start_app``; returns once the app is fully up."""
    await asyncio.to_thread(_script, "start_app", _name_of(node))


async def restart_app(node: str, down_for: float) -> None:
    """Stops the broker app on a private node, starts it ``down_for`` seconds later and waits
    until it is up again. Refuses any node but a private one (``NAME@localhost`` that
    scripts/rabbit-node.sh started and that still runs), so the machine's broker is never
    restarted."""
    await stop_app(node)
    try:
        await asyncio.sleep(down_for)
    finally:
        await start_app(node)
