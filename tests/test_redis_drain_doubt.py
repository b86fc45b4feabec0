"""RabbitMQ drains over Redis state when a claim's reply is lost on the way back.

The broker drain claims each window of messages in the index; a claim that ran on Redis but
whose reply never arrived must not leave its commands delivered to nobody, nor hand one out
twice: the next drain of the device hands them out once, in order.
"""

from __future__ import annotations

import aio_pika
import pytest

from amqp_queue import ClaimOutcomeUnknown, CommandStatus, RabbitMQConfig, RabbitMQStore
from amqp_queue.state import RedisStore, StateError
from tests.backends import REDIS_URL, redis_prefix
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.redis_faults import LosesReplies
from tests.support import unique


class Losing(LosesReplies):
    pass


@pytest.mark.parametrize("faults", ["lost", "refused"])
async def test_a_broker_drain_whose_claim_replies_are_lost_loses_and_repeats_nothing(
    faults: str,
) -> None:
    exchange = unique("test.")
    async with redis_prefix() as prefix:
        state = await RedisStore.connect(REDIS_URL, prefix=prefix, connection_class=Losing)
        connection = await aio_pika.connect_robust(AMQP_URL)
        store = RabbitMQStore(connection, RabbitMQConfig(exchange=exchange), state=state)
        Losing.only = state._claim_script.sha.encode()  # the drain's claims, nothing else
        try:
            async with store:
                ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(5)]
                if faults == "lost":
                    Losing.lose = 10  # the claim runs on Redis; every reply is lost
                else:
                    Losing.refuse = 10  # the claim never reaches Redis
                with pytest.raises((ClaimOutcomeUnknown, StateError)):
                    await store.drain_pending("dev-1")
                Losing.lose = Losing.refuse = 0
                ids.append(await store.enqueue("dev-1", b"c5", 600))

                first = await store.drain_pending("dev-1")
                again = await store.drain_pending("dev-1")

                assert first == [f"c{n}".encode() for n in range(6)]
                assert again == []
                for command_id in ids:
                    assert await store.get_status(command_id) == CommandStatus.DELIVERED
        finally:
            Losing.lose = Losing.refuse = 0
            Losing.only = None
            await connection.close()
            await state.close()
            await delete_namespace(exchange, ["dev-1"])
