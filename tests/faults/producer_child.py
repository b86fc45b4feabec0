"""A producer process for crash trials; the harness kills it with SIGKILL at a random moment.

``python -m tests.faults.producer_child AMQP_URL STATE_SPEC EXCHANGE SEED DEVICE...``

Prints a JSON line as each operation starts and another as it returns (flushed at once), so
everything that returned before the kill is on record.
"""

from __future__ import annotations

import asyncio
import random
import sys

from tests.faults.states import rabbitmq_on
from tests.faults.workload import LineRecorder, Producer, trial_config


async def main(amqp_url: str, spec: str, exchange: str, seed: str, devices: list[str]) -> None:
    recorder = LineRecorder()
    async with rabbitmq_on(spec, amqp_url, trial_config(exchange)) as store:
        recorder.ready()
        producers = [
            Producer(store, device, random.Random(f"{seed}/{device}"), recorder)
            for device in devices
        ]
        await asyncio.gather(*(producer.run() for producer in producers))


if __name__ == "__main__":
    url, state_spec, exchange_name, trial_seed, *device_ids = sys.argv[1:]
    asyncio.run(main(url, state_spec, exchange_name, trial_seed, device_ids))
