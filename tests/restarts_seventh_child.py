"""Child processes of tests/test_adversarial_restarts_seventh.py; the test SIGKILLs them.

``python -m tests.restarts_seventh_child producer AMQP_URL STATE_URL EXCHANGE SEED MODE DEVICES``
runs lanes of calls (MODE ``seq``: one lane per device plus a fan-out lane; ``conc``: three
more plain lanes per device) and prints one JSON line as each call starts and as it returns
or raises (flushed at once), with ``time.monotonic()`` (system-wide on Linux).

``python -m tests.restarts_seventh_child consumer AMQP_URL STATE_URL EXCHANGE DEVICE`` consumes
one device, printing each command as its loop body starts and as it ends.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

from amqp_queue import QueueError, RabbitMQConfig, RabbitMQStore

TTL = 600


def emit(**event: Any) -> None:
    event["t"] = time.monotonic()
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def call(op: str, key: str, device: str | None, coro: Any) -> Any:
    emit(ev="start", op=op, key=key, device=device)
    try:
        result = await coro
    except QueueError as exc:
        emit(ev="raised", op=op, key=key, device=device, error=type(exc).__name__)
        return None
    except Exception as exc:  # outside the hierarchy: a defect the test reports
        emit(ev="foreign", op=op, key=key, device=device, error=repr(exc))
        return None
    emit(ev="done", op=op, key=key, device=device, result=result)
    return result


async def device_lane(store: RabbitMQStore, device: str, rng: random.Random, ops: int) -> None:
    unconfirmed: list[tuple[str, str]] = []
    for n in range(ops):
        roll = rng.random()
        key = f"{device}/L{n}"
        if roll < 0.2 and unconfirmed:
            target_key, target_id = unconfirmed.pop(0)
            await call("confirm", target_key, device, store.confirm_command(target_id))
        elif roll < 0.45:
            await call(
                "update", key, device, store.enqueue_or_update(device, "sp", key.encode(), TTL)
            )
        elif roll < 0.6:
            # A command type of its own: no confirmation command replaces another.
            command_id = await call(
                "confirmable",
                key,
                device,
                store.enqueue_with_confirmation(device, f"ul{n}", key.encode(), TTL),
            )
            if command_id is not None:
                unconfirmed.append((key, command_id))
        else:
            await call("plain", key, device, store.enqueue(device, key.encode(), TTL))


async def plain_lane(store: RabbitMQStore, device: str, lane: int, ops: int) -> None:
    for n in range(ops):
        key = f"{device}/P{lane}.{n}"
        await call("plain", key, device, store.enqueue(device, key.encode(), TTL))


async def fanout_lane(
    store: RabbitMQStore, devices: list[str], rng: random.Random, ops: int
) -> None:
    for n in range(ops):
        key = f"F{n}"
        roll = rng.random()
        if roll < 0.4:
            rollout = await call(
                "fanout", key, None, _rollout(store.enqueue_many(devices, key.encode(), TTL))
            )
        elif roll < 0.7:
            rollout = await call(
                "fanout_update",
                key,
                None,
                _rollout(store.enqueue_many(devices, key.encode(), TTL, command_type="fw")),
            )
        else:
            rollout = await call(
                "fanout_confirmable",
                key,
                None,
                _rollout(
                    store.enqueue_many(
                        devices,
                        key.encode(),
                        TTL,
                        command_type=f"fc{n}",
                        requires_confirmation=True,
                    )
                ),
            )
            if rollout is not None and rng.random() < 0.8:
                await call("confirm_rollout", key, None, store.confirm_rollout(rollout["rollout"]))


async def _rollout(coro: Any) -> dict[str, Any]:
    rollout = await coro
    return {"rollout": rollout.rollout_id, "ids": list(rollout.command_ids)}


async def producer(
    amqp_url: str, state_url: str, exchange: str, seed: str, mode: str, devices: str
) -> None:
    device_ids = devices.split(",")
    config = RabbitMQConfig(exchange=exchange)
    store = await RabbitMQStore.connect(amqp_url, state_url=state_url, config=config)
    emit(ev="ready")
    rng = random.Random(seed)
    lanes = [
        device_lane(store, device, random.Random(f"{seed}/{device}"), 400) for device in device_ids
    ]
    lanes.append(fanout_lane(store, device_ids, random.Random(f"{seed}/fan"), 100))
    if mode == "conc":
        lanes += [
            plain_lane(store, device, lane, 150) for device in device_ids for lane in range(3)
        ]
    rng.shuffle(lanes)
    await asyncio.gather(*lanes)
    emit(ev="finished")
    await asyncio.sleep(3600)  # killed here at the latest


async def consumer(amqp_url: str, state_url: str, exchange: str, device: str, seed: str) -> None:
    rng = random.Random(seed)
    config = RabbitMQConfig(exchange=exchange)
    store = await RabbitMQStore.connect(amqp_url, state_url=state_url, config=config)
    emit(ev="ready")
    async with store.consume(device) as stream:
        async for command in stream:
            emit(ev="body", id=command.id, payload=command.payload.decode())
            await asyncio.sleep(rng.uniform(0, 0.01))
            emit(ev="body_done", id=command.id, payload=command.payload.decode())


async def scripted(amqp_url: str, state_url: str, exchange: str, relay_after: str) -> None:
    """Runs the calls read from stdin, one JSON object a line: ``{"op": "enqueue", "device":
    ..., "payload": ...}``; prints each call as it starts and returns."""
    config = RabbitMQConfig(
        exchange=exchange, relay_after=float(relay_after), publish_timeout=2.0, relay_interval=1.0
    )
    store = await RabbitMQStore.connect(amqp_url, state_url=state_url, config=config)
    emit(ev="ready")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        order = json.loads(line)
        device, payload = order["device"], order["payload"]
        await call("plain", payload, device, store.enqueue(device, payload.encode(), TTL))
    await asyncio.sleep(3600)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "producer":
        asyncio.run(producer(*args))
    elif role == "scripted":
        asyncio.run(scripted(*args))
    else:
        asyncio.run(consumer(*args))
