"""RabbitMQStore settings: one keyword-only dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from amqp_queue.state.errors import InvalidDeviceId
from amqp_queue.state.validation import DEFAULT_LIMITS, Limits, validate_device_id

MAX_NAME_BYTES = 255
"""AMQP's limit on an exchange or queue name (a short string), in UTF-8 bytes."""

MESSAGE_OVERHEAD = 4096
"""Bytes of a message's size kept for its properties and headers, besides the payload."""

SEPARATOR = "/"
"""Between the exchange and the device id in a queue name: a character device ids cannot hold."""


def require_positive(settings: object, *names: str) -> None:
    """Raises ValueError naming the first of ``names`` whose value on ``settings`` is not
    above zero (NaN included)."""
    for name in names:
        if not getattr(settings, name) > 0:
            raise ValueError(f"{name} must be positive")


class QueueType(enum.StrEnum):
    """The kind of device queue. Classic is the default; quorum replicates across a cluster."""

    CLASSIC = "classic"
    QUORUM = "quorum"


@dataclass(frozen=True, slots=True, kw_only=True)
class RabbitMQConfig:
    """How RabbitMQStore talks to the broker.

    Attributes:
        exchange: the direct exchange commands are published to. A device's queue is named
            ``<exchange>/<device_id>``: device ids cannot hold ``/``, so no two (exchange,
            device) pairs share a queue and another exchange name is a separate namespace
            (``E`` with device ``sub.gw1`` is ``E/sub.gw1``, ``E.sub`` with ``gw1`` is
            ``E.sub/gw1``). A queue name has at most 255 UTF-8 bytes, so a long exchange
            shortens the device ids it can serve (:meth:`validate_device`); one over 253
            bytes leaves room for none and is refused.
        durable: declare the exchange and device queues durable (survive a broker restart).
        queue_type: classic (default) or quorum device queues. Quorum queues are always
            durable and replicated; pick them on a cluster where losing a node must not lose
            queued commands. They put a requeued message at the back, so ``consume`` there
            hands out in the index's ready order (see :mod:`amqp_queue.requeue_order`) and
            acks each command alone.
        prefetch: how many messages a consumer takes per window (its unacknowledged
            bound); the state index is asked about a whole window in one query. A drain
            reads without a bound, claims once it has read the queue to the end and acks
            when it hands over.
        limits: device id, command type, payload and TTL bounds (rule 7). The payload bound
            must stay 4 KiB (for properties and headers) under ``max_message_size``. Its
            ``max_pending_per_device`` (rule 11) is enforced by the state index with the
            index's own limits: ``RabbitMQStore.connect`` opens the index with these; give
            an index you build yourself the same.
        max_message_size: the largest message the broker accepts (its ``max_message_size``,
            128 MiB by default on RabbitMQ 3.10). If you raised the broker's, raise this to
            match before raising ``limits.max_payload_bytes``. A command the broker refuses
            anyway (its limit is lower than this says) ends ``REJECTED``.
        publish_timeout: seconds to wait for a publisher confirm before the command is left
            to the outbox relay. The publish itself goes on in its turn on the channel (a
            command withdrawn unsent would let the next one to its device overtake it).
        relay_interval: seconds between outbox relay passes when nothing wakes it sooner.
        relay_batch: commands the relay reads, and publishes at once, per step of a pass.
        relay_after: seconds an unpublished command that this process does not owe waits
            before this store's relay publishes it: its writer (another process sharing the
            state, or this one before a restart) may still be publishing it, and publishing
            it here too would put a copy in the device's queue. None (the default):
            ``publish_timeout``. Commands this process owes (a failed publish) are relayed
            at once; so, a second after this store first saw them, are those found
            unpublished at its start that hold back a command it owes (see
            :data:`~amqp_queue.relay_holds.WRITER_GRACE`).
        channels_per_connection: the most channels the store opens on one connection for
            ``consume()`` streams and drains (one each); when its connections are full it
            opens another to the same broker. RabbitMQ closes a whole connection that opens
            more than its ``channel_max`` (2,047 by default), so keep this below that.
        max_connections: connections the store opens in all for streams and drains, its
            first included: at most ``channels_per_connection x max_connections`` (16,000 by
            default) run at once; one more fails that call with BrokerError, nothing else.
        drain_idle: seconds a drain waits for another message before asking the broker
            whether the device queue is empty.
        declare_channels: channels the store declares device queues on. The broker runs one
            channel's declarations one after another, so a first command to many new devices
            at once (or after a restart, which empties the cache of declared queues) goes
            faster over a few.
        declared_cache: how many device queues a process remembers as declared, the most
            recently used (with the devices it reports in ``declared_devices``). Publishing
            to a device it forgot declares the queue again: one round trip to the broker.
        recheck_after: 0 (the default): ``consume`` asks the index about each command left
            in a prefetch window as it hands it out (one indexed read), so a command cancelled
            or superseded before the device asked for it is never handed out (rule 3). A
            positive value asks about all of them together, at most every ``recheck_after``
            seconds: cheaper for devices that take commands in quick succession, but a
            command cancelled or superseded less than that before the device asked may still
            be handed out.
    """

    exchange: str = "ble.commands"
    durable: bool = True
    queue_type: QueueType = QueueType.CLASSIC
    prefetch: int = 1000
    limits: Limits = field(default=DEFAULT_LIMITS)
    max_message_size: int = 134_217_728
    publish_timeout: float = 10.0
    relay_interval: float = 30.0
    relay_batch: int = 500
    relay_after: float | None = None
    channels_per_connection: int = 2000
    max_connections: int = 8
    drain_idle: float = 0.05
    recheck_after: float = 0.0
    declare_channels: int = 4
    declared_cache: int = 100_000

    def __post_init__(self) -> None:
        if not self.exchange or self.exchange.startswith("amq."):
            raise ValueError(f"exchange name {self.exchange!r} is empty or AMQP-reserved")
        if len(self.queue_prefix.encode()) >= MAX_NAME_BYTES:
            raise ValueError(
                f"exchange name is {len(self.exchange.encode())} UTF-8 bytes: device queues "
                f"are named <exchange>{SEPARATOR}<device_id> within {MAX_NAME_BYTES} bytes, "
                "which leaves no room for a device id"
            )
        largest = self.max_message_size - MESSAGE_OVERHEAD
        if self.limits.max_payload_bytes > largest:
            raise ValueError(
                f"limits.max_payload_bytes of {self.limits.max_payload_bytes} is over what "
                f"the broker accepts: max_message_size of {self.max_message_size} less "
                f"{MESSAGE_OVERHEAD} bytes for properties and headers, {largest}; raise "
                "max_message_size only if the broker's max_message_size is raised too"
            )
        if self.queue_type is QueueType.QUORUM and not self.durable:
            raise ValueError("quorum queues are always durable; set durable=True")
        for name in (
            "prefetch",
            "relay_batch",
            "declare_channels",
            "declared_cache",
            "channels_per_connection",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        require_positive(self, "publish_timeout", "relay_interval", "drain_idle")
        if self.recheck_after < 0:
            raise ValueError("recheck_after must not be negative")
        if self.relay_after is not None and not self.relay_after >= 0:
            raise ValueError("relay_after must not be negative")

    @property
    def relay_lease(self) -> float:
        """Seconds past ready before the relay publishes a command it does not owe."""
        return self.publish_timeout if self.relay_after is None else self.relay_after

    @property
    def queue_prefix(self) -> str:
        """What the name of every device queue of this exchange starts with: ``<exchange>/``."""
        return f"{self.exchange}{SEPARATOR}"

    def queue_name(self, device_id: str) -> str:
        """The name of a device's queue: ``<exchange>/<device_id>``."""
        return f"{self.queue_prefix}{device_id}"

    def validate_device(self, device_id: object) -> str:
        """Checks a device id against the limits and the length of its queue name.

        Returns:
            The device id.

        Raises:
            InvalidDeviceId: the id breaks the limits (see
                :func:`amqp_queue.state.validation.validate_device_id`), or its queue name would be
                over AMQP's 255 bytes.
        """
        device = validate_device_id(device_id, self.limits)
        size = len(self.queue_name(device).encode())
        if size > MAX_NAME_BYTES:
            raise InvalidDeviceId(
                f"device id of {len(device)} characters makes its queue name {size} bytes, "
                f"over AMQP's {MAX_NAME_BYTES}, with exchange {self.exchange!r}"
            )
        return device
