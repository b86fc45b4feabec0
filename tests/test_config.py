"""RabbitMQConfig refuses settings that cannot work, before any connection is made."""

from __future__ import annotations

from typing import Any

import pytest

from amqp_queue import QueueType, RabbitMQConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"exchange": ""}, "empty or AMQP-reserved"),
        ({"exchange": "amq.direct"}, "empty or AMQP-reserved"),
        ({"queue_type": QueueType.QUORUM, "durable": False}, "quorum queues are always durable"),
        ({"prefetch": 0}, "prefetch must be at least 1"),
        ({"relay_batch": 0}, "relay_batch must be at least 1"),
        ({"declare_channels": 0}, "declare_channels must be at least 1"),
        ({"publish_timeout": 0}, "publish_timeout must be positive"),
        ({"relay_interval": -1.0}, "relay_interval must be positive"),
        ({"drain_idle": 0.0}, "drain_idle must be positive"),
        ({"recheck_after": -0.1}, "recheck_after must not be negative"),
    ],
)
def test_unworkable_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RabbitMQConfig(**settings)


def test_device_queues_are_named_within_the_exchange_namespace() -> None:
    config = RabbitMQConfig(exchange="fleet.a", declare_channels=1)
    assert config.queue_name("gw-7") == "fleet.a/gw-7"
