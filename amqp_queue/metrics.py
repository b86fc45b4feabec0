"""Prometheus metrics: an :class:`~amqp_queue.observer.Observer` backed by prometheus_client.

Each :class:`PrometheusObserver` has its own registry, so several stores (or tests) in one
process never collide; :meth:`PrometheusObserver.render` is what ``/metrics`` serves.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from amqp_queue.observer import Observer
from amqp_queue.state.model import CommandRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The Content-Type of :meth:`PrometheusObserver.render`'s output."""

# A publish is confirmed in milliseconds, or after a broker outage in minutes.
_PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 300)
# Delivery waits for the device: from milliseconds when it is online to days when it sleeps.
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


def _mode(record: CommandRecord) -> str:
    if record.requires_confirmation:
        return "confirm"
    return "plain" if record.command_type is None else "latest"


class PrometheusObserver(Observer):
    """Counts what happens to commands and keeps a pending gauge.

    ``amqp_queue_commands_pending`` is what this process has seen: commands it accepted,
    less those it saw delivered, superseded, cancelled or expired by ``cleanup``. It starts
    at zero with the process, and deliveries made by other processes (devices consuming
    elsewhere) are not seen, so compare ``enqueued`` and ``delivered`` across processes
    for a fleet-wide view.

    Args:
        registry: where the metrics are registered; a new one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def counter(name: str, documentation: str) -> Counter:
            return Counter(f"amqp_queue_{name}", documentation, registry=self.registry)

        self._enqueued = Counter(
            "amqp_queue_commands_enqueued",
            "Commands written to the state index, by mode (plain, latest, confirm).",
            ["mode"],
            registry=self.registry,
        )
        self._published = counter("commands_published", "Commands the broker confirmed.")
        self._delivered = counter("commands_delivered", "Commands handed to their device.")
        self._superseded = counter(
            "commands_superseded", "Commands replaced by a newer one of their type."
        )
        self._confirmed = counter(
            "commands_confirmed", "Successful confirm calls (confirming twice counts twice)."
        )
        self._cancelled = counter("commands_cancelled", "Commands an operator cancelled.")
        self._expired = counter(
            "commands_expired", "Commands cleanup ended because their TTL ran out."
        )
        self._rejected = counter(
            "commands_rejected",
            "Commands the broker refused for good (over its message size, say).",
        )
        self._outcomes = Counter(
            "amqp_queue_commands_outcomes",
            "Outcomes of delivered commands, by outcome (succeeded, failed, timed_out).",
            ["outcome"],
            registry=self.registry,
        )
        self._dropped = counter(
            "messages_dropped",
            "Stale messages (superseded, cancelled, expired, delivered) dropped at delivery.",
        )
        self._relay_failures = counter(
            "relay_failures",
            "Outbox relay passes that failed for an unexpected reason (the relay restarted).",
        )
        self._pending = Gauge(
            "amqp_queue_commands_pending",
            "Commands accepted by this process and not yet seen to finish.",
            registry=self.registry,
        )
        self._publish_latency = Histogram(
            "amqp_queue_publish_latency_seconds",
            "Seconds from a command becoming ready to the broker's publisher confirm.",
            buckets=_PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self._delivery_latency = Histogram(
            "amqp_queue_delivery_latency_seconds",
            "Seconds from a command becoming ready to its device taking it.",
            buckets=_DELIVERY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    # -- Observer hooks: cheap and never raising, as the store calls them inline ---------

    def enqueued(self, records: Sequence[CommandRecord], superseded: int) -> None:
        for record in records:
            self._enqueued.labels(mode=_mode(record)).inc()
        self._superseded.inc(superseded)
        self._pending.inc(len(records) - superseded)

    def published(self, record: CommandRecord, seconds: float) -> None:
        self._published.inc()
        self._publish_latency.observe(seconds)

    def delivered(self, records: Sequence[CommandRecord], seconds: Sequence[float]) -> None:
        self._delivered.inc(len(records))
        self._pending.dec(len(records))
        for latency in seconds:
            self._delivery_latency.observe(latency)

    def dropped(self, count: int) -> None:
        self._dropped.inc(count)

    def confirmed(self, record: CommandRecord) -> None:
        self._confirmed.inc()

    def cancelled(self, record: CommandRecord) -> None:
        self._cancelled.inc()
        self._pending.dec()

    def expired(self, count: int) -> None:
        self._expired.inc(count)
        self._pending.dec(count)

    def rejected(self, record: CommandRecord) -> None:
        self._rejected.inc()
        self._pending.dec()

    def outcome(self, record: CommandRecord) -> None:
        if record.outcome is not None:
            self._outcomes.labels(outcome=record.outcome.value).inc()

    def timed_out(self, count: int) -> None:
        self._outcomes.labels(outcome="timed_out").inc(count)

    def relay_failed(self) -> None:
        self._relay_failures.inc()
