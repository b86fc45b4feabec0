"""``close()`` of a store on Redis state whose link stalled while drains claimed.

Found by a helper's public-API probe: each device whose drain's claim was in doubt was
settled one after another at close (and on every relay pass), each waiting out Redis's
socket timeout on the stalled link: close took 5 s per device (60 s for 12). The settling
now stops at the first failure; the rest wait for the next pass, their claims lapsing
meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.faults.private_redis import private_redis
from tests.rabbitmq_support import rabbitmq_store
from tests.support import unique
from tests.tcp_proxy import StallProxy


async def test_close_on_a_stalled_link_waits_once_not_per_device(tmp_path: Path) -> None:
    devices = [f"gw-{n}" for n in range(4)]
    async with private_redis() as redis_server:
        proxy = StallProxy(redis_server.port)
        await proxy.start()
        try:
            state_url = f"redis://127.0.0.1:{proxy.port}/0?prefix={unique('stall-')}:"
            async with rabbitmq_store(tmp_path, state_url=state_url) as store:
                for device in devices:
                    await store.enqueue(device, b"cmd", 300)
                await asyncio.sleep(0.5)  # published
                proxy.stall()
                drains = [store.drain_pending(device) for device in devices]
                failed = await asyncio.gather(*drains, return_exceptions=True)
                assert all(isinstance(failure, Exception) for failure in failed)
                started = time.monotonic()
                await store.close()
                took = time.monotonic() - started
        finally:
            proxy.resume()
            await proxy.close()
    # One Redis socket timeout (5 s) and the broker's own bounded steps, not one per device.
    assert took < 12, f"close took {took:.1f} s with {len(devices)} devices' claims in doubt"
