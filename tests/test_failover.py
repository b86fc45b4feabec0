"""Several broker addresses: a bad list is refused, and the store fails over between nodes.

The "nodes" here are TCP proxies in front of the one broker, so a node can go away (the
proxy is cut) while the others stay.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amqp_queue import RabbitMQStore
from amqp_queue.connection import broker_urls
from tests.rabbitmq_support import AMQP_URL, rabbitmq_store
from tests.support import eventually
from tests.tcp_proxy import TCPProxy

DEAD = "amqp://guest:guest@127.0.0.1:1/"


def test_a_broker_address_is_one_url_a_list_or_urls_separated_by_commas() -> None:
    assert [str(url) for url in broker_urls(AMQP_URL)] == [AMQP_URL]
    assert len(broker_urls(f"{DEAD}, {AMQP_URL}")) == 2
    assert len(broker_urls([DEAD, AMQP_URL])) == 2


@pytest.mark.parametrize(
    "address",
    ["", " , ", [], "http://127.0.0.1:5672/", "amqp://", f"{AMQP_URL},localhost:5672"],
)
async def test_a_bad_broker_address_is_refused_before_anything_opens(
    address: str | list[str], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        await RabbitMQStore.connect(address, state_url=f"sqlite+aiosqlite:///{tmp_path}/s.db")
    assert not (tmp_path / "s.db").exists()


async def test_a_dead_first_node_is_passed_over(tmp_path: Path) -> None:
    async with rabbitmq_store(tmp_path, amqp_url=f"{DEAD},{AMQP_URL}") as store:
        await store.enqueue("gw-1", b"via the second node", 600)
        assert await store.drain_pending("gw-1") == [b"via the second node"]


async def test_a_lost_node_fails_over_to_the_next(tmp_path: Path) -> None:
    async with TCPProxy() as first, TCPProxy() as second:
        nodes = f"{first.amqp_url}?reconnect_interval=0.2,{second.amqp_url}"
        async with rabbitmq_store(tmp_path, amqp_url=nodes, publish_timeout=2.0) as store:
            await store.enqueue("gw-1", b"before", 600)
            assert second.connection_count == 0

            await first.cut()  # the node is gone, and stays gone

            async def on_the_second_node() -> bool:
                return second.connection_count > 0

            await eventually(on_the_second_node, 20)
            await store.enqueue("gw-1", b"after", 600)

            got: list[bytes] = []

            async def both_delivered() -> bool:
                got.extend(await store.drain_pending("gw-1"))
                return len(got) == 2

            await eventually(both_delivered, 20)
            assert got == [b"before", b"after"]
