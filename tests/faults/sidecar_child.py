"""A sidecar process for the sidecar-loss trials: one RabbitMQStore (its outbox relay
running) on a state index that other sidecars share.

``python -m tests.faults.sidecar_child AMQP_URL STATE_SPEC EXCHANGE SEED NAME PRODUCE CONSUME``

PRODUCE and CONSUME are comma-separated device ids (or ``-``): it runs a producer for each of
the first and a ``consume()`` device loop for each of the second, printing JSON lines as the
other children do. Lines on its standard input: ``consume DEVICE,...`` starts device loops for
more devices (taking over from a dead sidecar); ``stop`` ends its producers; ``quit`` ends
everything and closes the store.
"""

from __future__ import annotations

import asyncio
import random
import sys
from itertools import count

from tests.faults.ledger import Delivery
from tests.faults.states import rabbitmq_on
from tests.faults.workload import LineRecorder, Producer, consume_forever, trial_config


class StreamRecorder(LineRecorder):
    """Names the stream of each hand-out: this sidecar, the device and which of its device
    loops (order is judged per stream)."""

    def __init__(self, stream: str) -> None:
        super().__init__()
        self._stream = stream

    def delivered(self, delivery: Delivery) -> None:
        delivery.stream = self._stream
        super().delivered(delivery)


def _devices(listed: str) -> list[str]:
    return [] if listed == "-" else listed.split(",")


async def main(
    amqp_url: str, spec: str, exchange: str, seed: str, name: str, produce: str, consume: str
) -> None:
    recorder = LineRecorder()
    loops = count()
    async with rabbitmq_on(spec, amqp_url, trial_config(exchange)) as store:

        def device_loop(device: str) -> asyncio.Task[None]:
            stream = StreamRecorder(f"{name}/{device}/{next(loops)}")
            rng = random.Random(f"{seed}/{name}/{device}")
            return asyncio.create_task(consume_forever(store, device, stream, rng))

        stop = asyncio.Event()
        producers = [
            asyncio.create_task(
                Producer(
                    store, device, random.Random(f"{seed}/{device}"), recorder, pause=0.01
                ).run(stop)
            )
            for device in _devices(produce)
        ]
        consumers = [device_loop(device) for device in _devices(consume)]
        recorder.ready()
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async for raw in reader:
            command, _, argument = raw.decode().strip().partition(" ")
            if command == "consume":
                consumers += [device_loop(device) for device in _devices(argument)]
            elif command == "stop":
                stop.set()
                await asyncio.gather(*producers)
            elif command == "quit":
                break
        stop.set()
        for task in [*producers, *consumers]:
            task.cancel()
        await asyncio.gather(*producers, *consumers, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:8]))
