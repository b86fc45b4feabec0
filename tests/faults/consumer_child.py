"""A device process for crash trials; the harness kills it with SIGKILL at a random moment.

``python -m tests.faults.consumer_child AMQP_URL STATE_SPEC EXCHANGE consume|drain SEED DEVICE...``

Prints a JSON line for each command the device finished handling (flushed at once); on
``consume`` it then reports the outcome of half of them (the judge checks it took them).
"""

from __future__ import annotations

import asyncio
import random
import sys

from tests.faults.states import rabbitmq_on
from tests.faults.workload import LineRecorder, consume_forever, drain_forever, trial_config


async def main(
    amqp_url: str, spec: str, exchange: str, mode: str, seed: str, devices: list[str]
) -> None:
    recorder = LineRecorder()
    async with rabbitmq_on(spec, amqp_url, trial_config(exchange)) as store:
        recorder.ready()
        if mode == "consume":
            loops = [
                consume_forever(
                    store, device, recorder, random.Random(f"{seed}/{device}"), reports=0.5
                )
                for device in devices
            ]
        else:
            loops = [drain_forever(store, device, recorder) for device in devices]
        await asyncio.gather(*loops)


if __name__ == "__main__":
    url, state_spec, exchange_name, how, trial_seed, *device_ids = sys.argv[1:]
    asyncio.run(main(url, state_spec, exchange_name, how, trial_seed, device_ids))
