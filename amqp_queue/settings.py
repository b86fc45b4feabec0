"""Settings of the sidecar service and the CLI: one keyword-only dataclass.

Every setting has a flag and an environment variable: the names below, and
``AMQP_QUEUE_<NAME>`` for each knob of :class:`RabbitMQConfig` and its limits (see
:mod:`amqp_queue.cli.options`). The defaults work on a developer machine with a local
RabbitMQ and the SQLite state file ``commands.db``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amqp_queue.auth import Tokens
from amqp_queue.config import RabbitMQConfig, require_positive
from amqp_queue.state.factory import DEFAULT_STATE_URL

ENV_PREFIX = "AMQP_QUEUE_"
"""Every environment variable but ``AMQP_URL`` is this and the setting's name in capitals."""

ENV_AMQP_URL = "AMQP_URL"
ENV_STATE_URL = f"{ENV_PREFIX}STATE_URL"
ENV_EXCHANGE = f"{ENV_PREFIX}EXCHANGE"
ENV_BIND = f"{ENV_PREFIX}BIND"
ENV_TOKENS = f"{ENV_PREFIX}TOKENS"
ENV_CLEANUP_INTERVAL = f"{ENV_PREFIX}CLEANUP_INTERVAL"
ENV_CONNECT_TIMEOUT = f"{ENV_PREFIX}CONNECT_TIMEOUT"
ENV_LOG_LEVEL = f"{ENV_PREFIX}LOG_LEVEL"
ENV_FOUR_EYES = f"{ENV_PREFIX}FOUR_EYES"

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_EXCHANGE = RabbitMQConfig().exchange
# Loopback by default, so a service started by hand is not reachable from the network;
# the Docker image sets 0.0.0.0:8080.
DEFAULT_BIND = "127.0.0.1:8080"
DEFAULT_CLEANUP_INTERVAL = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0
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
        rabbitmq: the store's configuration: the exchange, and so the namespace of device
            queues (``AMQP_QUEUE_EXCHANGE``), queue type, timings and limits.
        host: the address the HTTP API binds to.
        port: the HTTP API's port; 0 picks a free one.
        tokens: the operator API's bearer tokens (``AMQP_QUEUE_TOKENS``).
        cleanup_interval: seconds between cleanup passes of the service.
        max_body_bytes: the largest request body the API reads.
        shutdown_timeout: seconds in-flight requests get to finish on SIGTERM.
        connect_timeout: seconds to keep trying to reach the broker at start-up.
        four_eyes: the API refuses a token confirming a command it enqueued itself
            (``AMQP_QUEUE_FOUR_EYES``).
    """

    amqp_url: str = DEFAULT_AMQP_URL
    state_url: str = DEFAULT_STATE_URL
    rabbitmq: RabbitMQConfig = field(default_factory=RabbitMQConfig)
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: Tokens = field(default_factory=Tokens)
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 30.0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    four_eyes: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is outside 0-65535")
        require_positive(self, "cleanup_interval", "shutdown_timeout", "connect_timeout")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")

    @property
    def exchange(self) -> str:
        """The exchange commands are published to (``rabbitmq.exchange``)."""
        return self.rabbitmq.exchange


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
