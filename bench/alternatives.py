"""The same job done by other tools on this machine: enqueue commands, then drain them.

Each tool queues ``alternatives`` commands of 64 bytes over ``devices`` devices while the
devices are offline, then each device drains its queue. What each one guarantees differs,
and the table says so: only amqp-queue keeps a durable index (dedup, confirmation, status).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from typing import Any

from bench.harness import Context, Target, rate
from bench.services import (
    AMQP_URL,
    MQTT_HOST,
    MQTT_PORT,
    PAYLOAD,
    TTL,
    device_ids,
    rabbitmq_store,
    unique,
)
from bench.throughput import enqueue_concurrent, enqueue_sequential

GROUP = "Enqueue then drain, against other tools"


def kombu_round(devices: list[str], count: int, idle: float) -> float:
    """kombu: a SimpleQueue per device (durable, persistent messages, publisher confirms).

    Returns the seconds from the first put to the last ack.
    """
    from kombu.connection import Connection

    prefix = unique("bench.kombu")
    url = AMQP_URL.replace("amqp://", "pyamqp://", 1)
    # kombu's Connection is not annotated.
    with Connection(url, transport_options={"confirm_publish": True}) as conn:  # type: ignore[no-untyped-call]
        channel = conn.channel()
        queues = {device: conn.SimpleQueue(f"{prefix}.{device}") for device in devices}
        try:
            started = time.perf_counter()
            for _, device in zip(range(count), itertools.cycle(devices), strict=False):
                queues[device].put(PAYLOAD)
            received = 0
            for simple in queues.values():
                while True:
                    try:
                        message = simple.get(block=True, timeout=idle)
                    except simple.Empty:
                        break
                    message.ack()
                    received += 1
            seconds = time.perf_counter() - started
        finally:
            for simple in queues.values():
                simple.close()
            for device in devices:
                name = f"{prefix}.{device}"
                channel.queue_delete(name)
                channel.exchange_delete(name)
            channel.close()
    if received != count:
        raise RuntimeError(f"kombu drained {received} of {count} messages")
    return seconds


def mosquitto_round(devices: list[str], count: int) -> float:
    """Mosquitto: QoS 1 to offline subscribers with persistent sessions, then reconnect.

    Returns the seconds from the first publish to the last message received.
    """
    from paho.mqtt.client import Client, MQTTMessage
    from paho.mqtt.enums import CallbackAPIVersion

    prefix = unique("bench-mqtt").replace(".", "-")
    topics = {device: f"{prefix}/{device}" for device in devices}
    inbox: queue.SimpleQueue[str] = queue.SimpleQueue()

    def session(device: str, *, clean: bool) -> Client:
        client = Client(
            CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{device}", clean_session=clean
        )
        subscribed = threading.Event()

        def on_connect(client: Client, *_: Any) -> None:
            client.subscribe(topics[device], qos=1)

        def on_message(_client: Client, _userdata: Any, message: MQTTMessage) -> None:
            inbox.put(device)

        client.on_connect = on_connect
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = on_message
        client.connect(MQTT_HOST, MQTT_PORT)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"mosquitto did not confirm the subscription of {device}")
        return client

    # Each device subscribes once with a persistent session, then goes offline.
    for device in devices:
        client = session(device, clean=False)
        client.disconnect()
        client.loop_stop()
    publisher = Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-publisher")
    publisher.max_inflight_messages_set(1000)
    publisher.connect(MQTT_HOST, MQTT_PORT)
    publisher.loop_start()
    online: list[Client] = []
    try:
        started = time.perf_counter()
        sent = [
            publisher.publish(topics[device], PAYLOAD, qos=1)
            for _, device in zip(range(count), itertools.cycle(devices), strict=False)
        ]
        for info in sent:
            info.wait_for_publish(10)
        online = [session(device, clean=False) for device in devices]
        for _ in range(count):
            inbox.get(timeout=10)
        seconds = time.perf_counter() - started
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        for client in online:
            client.disconnect()
            client.loop_stop()
        # A clean session discards what the broker kept for each device.
        for device in devices:
            client = Client(
                CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{device}", clean_session=True
            )
            client.connect(MQTT_HOST, MQTT_PORT)
            client.disconnect()
    return seconds


async def _aq_round(devices: list[str], count: int, producers: int) -> float:
    async with rabbitmq_store() as store:
        for device in devices:
            await store.ensure_queue(device)
        started = time.perf_counter()
        if producers == 1:
            await enqueue_sequential(store, devices, count)
        else:
            await enqueue_concurrent(store, devices, count, producers)
        received = 0
        for device in devices:
            received += len(await store.drain_pending(device))
        seconds = time.perf_counter() - started
    if received != count:
        raise RuntimeError(f"amqp-queue drained {received} of {count} commands")
    return seconds


async def bench_alternatives(ctx: Context) -> None:
    sizes, results = ctx.sizes, ctx.results
    devices = device_ids(sizes.devices)
    count = sizes.alternatives
    idle = 0.05
    for _ in range(sizes.runs):
        rows: list[tuple[str, str, float]] = [
            (
                "aq.round.sequential",
                "amqp-queue, sequential enqueue (index + broker, both durable)",
                await _aq_round(devices, count, 1),
            ),
            (
                "aq.round.concurrent",
                f"amqp-queue, {sizes.producers:,} concurrent producers",
                await _aq_round(devices, count, sizes.producers),
            ),
            (
                "kombu.round",
                "kombu SimpleQueue, persistent + publisher confirms (no index)",
                await asyncio.to_thread(kombu_round, devices, count, idle),
            ),
            (
                "mqtt.round",
                "Mosquitto, paho-mqtt QoS 1 to offline persistent sessions",
                await asyncio.to_thread(mosquitto_round, devices, count),
            ),
        ]
        for key, label, seconds in rows:
            results.record(key, rate(count, seconds), group=GROUP, label=label, unit="cmd/s")
    results.ratio(
        "amqp-queue sequential / kombu (enqueue then drain)",
        "aq.round.sequential",
        "kombu.round",
        Target(1.0),
    )
    results.ratio(
        "amqp-queue concurrent / kombu (enqueue then drain)",
        "aq.round.concurrent",
        "kombu.round",
        Target(1.0),
    )
    results.note(
        "kombu: the same broker, durable queues, persistent messages and publisher confirms, "
        "one put at a time (kombu's API is synchronous); no index, so no latest-intent-wins, "
        "no confirmation step, no status or cancel, and stale or expired messages are "
        f"delivered; each queue is drained with get() until {idle * 1000:.0f} ms pass idle, "
        "as amqp-queue's drain waits."
    )
    results.note(
        "Mosquitto 2 (paho-mqtt, MQTT 3.1.1): QoS 1 is at-least-once; messages for an offline "
        "client are kept in memory and written to disk only at autosave or shutdown (a crash "
        "loses them), and beyond max_queued_messages (1,000 by default) per client they are "
        "dropped silently; no TTL in 3.1.1, no dedup, no confirmation, no status. A PUBACK "
        f"means the broker has it in memory, not on disk. TTL used by amqp-queue: {TTL:.0f} s."
    )
