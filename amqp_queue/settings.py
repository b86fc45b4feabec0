"""Settings of the sidecar service and the CLI: one keyword-only dataclass.

Every setting has a flag and an environment variable (the names below); the defaults work
on a developer machine with a local RabbitMQ and the SQLite state file ``commands.db``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amqp_queue.auth import Tokens
from amqp_queue.config import RabbitMQConfig
from amqp_queue.state.factory import DEFAULT_STATE_URL

ENV_AMQP_URL = "AMQP_URL"
ENV_STATE_URL = "AMQP_QUEUE_STATE_URL"
ENV_EXCHANGE = "AMQP_QUEUE_EXCHANGE"
ENV_BIND = "AMQP_QUEUE_BIND"
ENV_TOKENS = "AMQP_QUEUE_TOKENS"
ENV_CLEANUP_INTERVAL = "AMQP_QUEUE_CLEANUP_INTERVAL"

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_EXCHANGE = RabbitMQConfig().exchange
# Loopback by default, so a service started by hand is not reachable from the network;
# the Docker image sets 0.0.0.0:8080.
DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_CLEANUP_INTERVAL = 60.0
# Room for the largest payload base64-encoded (4/3 of 256 KiB) plus the JSON around it.
DEFAULT_MAX_BODY_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How the service (and the CLI) reach the broker and the state, and what they serve.

    Attributes:
        amqp_url: the broker (``AMQP_URL``).
        state_url: the state index (``AMQP_QUEUE_STATE_URL``): SQLite, PostgreSQL (with
            ``?schema=<name>`` for a schema of its own), Redis; see
            :func:`amqp_queue.state.open_state`.
        exchange: the exchange, and so the namespace of device queues (``AMQP_QUEUE_EXCHANGE``).
        host: the address the HTTP API binds to.
        port: the HTTP API's port; 0 picks a free one.
        tokens: the operator API's bearer tokens (``AMQP_QUEUE_TOKENS``).
        cleanup_interval: seconds between cleanup passes of the service.
        max_body_bytes: the largest request body the API reads.
        shutdown_timeout: seconds in-flight requests get to finish on SIGTERM.
        connect_timeout: seconds to keep trying to reach the broker at start-up.
    """

    amqp_url: str = DEFAULT_AMQP_URL
    state_url: str = DEFAULT_STATE_URL
    exchange: str = DEFAULT_EXCHANGE
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: Tokens = field(default_factory=Tokens)
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0-65535")
        for name in ("cleanup_interval", "shutdown_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")

    @property
    def rabbitmq(self) -> RabbitMQConfig:
        """The store's configuration for these settings."""
        return RabbitMQConfig(exchange=self.exchange)


def parse_bind(bind: str) -> tuple[str, int]:
    """Splits ``host:port`` (``[::1]:8080`` for IPv6, ``:8080`` for every interface).

    Raises:
        ValueError: no port, or a port that is not a number in 0-65535.
    """
    host, sep, port = bind.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bind address {bind!r} is not host:port")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    return host, int(port)
