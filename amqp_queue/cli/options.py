"""The flags and environment variables of every setting, defined once for ``serve`` and the verbs.

Each field of :class:`RabbitMQConfig` and each field of its :class:`Limits` is an option
``--<name>`` (dashes for underscores) that falls back on the environment variable
``AMQP_QUEUE_<NAME>``; its default is the dataclass's own, so the two cannot drift apart. A
value of the wrong type or out of range is a usage error from click (exit 2); so are values
that do not fit together (a payload limit over ``--max-message-size``, quorum queues that
are not durable), which :class:`RabbitMQConfig` refuses when :func:`settings_from` builds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, TypeVar

import click

from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.settings import (
    DEFAULT_AMQP_URL,
    ENV_AMQP_URL,
    ENV_CONNECT_TIMEOUT,
    ENV_LOG_LEVEL,
    ENV_PREFIX,
    ENV_STATE_URL,
    Settings,
)
from amqp_queue.state.factory import DEFAULT_STATE_URL
from amqp_queue.state.validation import Limits

F = TypeVar("F", bound=Callable[..., Any])

VERB_CONNECT_TIMEOUT = 5.0
"""Seconds an operator command (and the demo) keeps trying to reach the broker: someone waits."""

SERVE_CONNECT_TIMEOUT = 10.0
"""Seconds ``serve`` keeps trying: a service may start a little before its broker."""

LOG_LEVELS = ("debug", "info", "warning", "error")


class FiniteFloat(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf``, which it lets by."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


POSITIVE = FiniteFloat(min=0, min_open=True)
# Ten years: far past any command's useful life, and far from where an expiry overflows a
# datetime (years past 9999) or a timedelta.
LONGEST_TTL = FiniteFloat(min=0, min_open=True, max=timedelta(days=3650).total_seconds())
NOT_NEGATIVE = FiniteFloat(min=0)
AT_LEAST_ONE = click.IntRange(min=1)

_CONFIG = RabbitMQConfig()


@dataclass(frozen=True, slots=True)
class Knob:
    """One field of :class:`RabbitMQConfig` or :class:`Limits` as an option.

    Attributes:
        name: the field's name; the flag and the environment variable are made from it.
        type: what click parses the value with.
        help: the option's help text.
    """

    name: str
    type: click.ParamType[Any]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def in_limits(self) -> bool:
        return self.name in _LIMIT_FIELDS

    @property
    def default(self) -> Any:
        value = getattr(_CONFIG.limits if self.in_limits else _CONFIG, self.name)
        if isinstance(value, timedelta):
            return value.total_seconds()
        if isinstance(value, QueueType):
            return value.value
        return value

    def option(self) -> Callable[[F], F]:
        """The click option, falling back on the environment variable."""
        flag = f"{self.flag}/--no-{self.flag[2:]}" if self.type is click.BOOL else self.flag
        default = self.default
        return click.option(
            flag,
            self.name,
            type=self.type,
            envvar=self.envvar,
            show_envvar=True,
            default=default,
            show_default="twice --publish-timeout" if default is None else True,
            help=self.help,
        )

    def value(self, given: Any) -> Any:
        """The field's value for what the option parsed."""
        if self.name == "queue_type":
            return QueueType(given)
        if self.name == "max_ttl":
            return timedelta(seconds=given)
        return given


_LIMIT_FIELDS = frozenset(field.name for field in fields(Limits))

KNOBS: tuple[Knob, ...] = (
    Knob("exchange", click.STRING, "The exchange; device queues are named <exchange>/<device>."),
    Knob(
        "queue_type",
        click.Choice([kind.value for kind in QueueType]),
        "Device queues: classic, or quorum (replicated across a cluster; always durable).",
    ),
    Knob("durable", click.BOOL, "Declare the exchange and device queues durable."),
    Knob(
        "prefetch",
        AT_LEAST_ONE,
        "Messages a consumer holds unacknowledged per window.",
    ),
    Knob(
        "publish_timeout",
        POSITIVE,
        "Seconds to wait for the broker's publisher confirm before leaving a command to the "
        "outbox relay.",
    ),
    Knob("relay_interval", POSITIVE, "Seconds between outbox relay passes."),
    Knob("relay_batch", AT_LEAST_ONE, "Commands the outbox relay publishes per pass."),
    Knob(
        "relay_after",
        NOT_NEGATIVE,
        "Seconds an unpublished command another process may still be publishing waits "
        "before this one's relay publishes it.",
    ),
    Knob(
        "drain_idle",
        POSITIVE,
        "Seconds a drain waits for another message before asking whether the queue is empty.",
    ),
    Knob(
        "recheck_after",
        NOT_NEGATIVE,
        "0: consume asks the index about each command as it hands it out; more: about a "
        "window of them at most this often (seconds).",
    ),
    Knob("declare_channels", AT_LEAST_ONE, "Channels device queues are declared on."),
    Knob("declared_cache", AT_LEAST_ONE, "Device queues a process remembers as declared."),
    Knob(
        "channels_per_connection",
        AT_LEAST_ONE,
        "Channels streams and drains open per connection before another connection is opened.",
    ),
    Knob(
        "max_connections",
        AT_LEAST_ONE,
        "Connections for streams and drains in all; one stream more fails by itself.",
    ),
    Knob(
        "max_message_size",
        AT_LEAST_ONE,
        "The broker's max_message_size, bytes; the payload limit stays 4 KiB under it.",
    ),
    Knob("max_payload_bytes", AT_LEAST_ONE, "The largest command payload, bytes."),
    Knob("max_ttl", LONGEST_TTL, "The longest time to live a command may have, seconds."),
    Knob("max_device_id_length", AT_LEAST_ONE, "The longest device id, characters."),
    Knob("max_command_type_length", AT_LEAST_ONE, "The longest command type, characters."),
    Knob(
        "max_pending_per_device",
        AT_LEAST_ONE,
        "Open commands (awaiting confirmation or pending) a device may hold; an enqueue past "
        "it is refused (QueueFull).",
    ),
    Knob(
        "max_reason_length",
        click.IntRange(min=0),
        "The longest reason a failed outcome may give, characters.",
    ),
)
"""Every field of RabbitMQConfig but ``limits``, and every field of Limits."""


def connect_timeout_option(default: float) -> Callable[[F], F]:
    return click.option(
        "--connect-timeout",
        envvar=ENV_CONNECT_TIMEOUT,
        show_envvar=True,
        type=POSITIVE,
        default=default,
        show_default=True,
        help="Seconds to keep trying to reach the broker.",
    )


def log_level_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--log-level",
        envvar=ENV_LOG_LEVEL,
        show_envvar=True,
        type=click.Choice(LOG_LEVELS),
        default=default,
        show_default=True,
        help="What is logged to stderr; debug also shows the broker client's own log.",
    )


def amqp_url_option(function: F) -> F:
    return click.option(
        "--amqp-url",
        envvar=ENV_AMQP_URL,
        show_envvar=True,
        default=DEFAULT_AMQP_URL,
        show_default=True,
        help="The RabbitMQ broker: one URL, or a cluster's nodes separated by commas.",
    )(function)


def state_url_option(function: F) -> F:
    return click.option(
        "--state-url",
        envvar=ENV_STATE_URL,
        show_envvar=True,
        default=DEFAULT_STATE_URL,
        show_default=True,
        help="The state index: sqlite+aiosqlite://, postgresql+asyncpg:// (?schema=), redis://.",
    )(function)


def settings_options(*, connect_timeout: float, log_level: str) -> Callable[[F], F]:
    """Adds every setting's option; :func:`settings_from` turns what they parsed into Settings.

    Args:
        connect_timeout: the default of ``--connect-timeout``.
        log_level: the default of ``--log-level``.
    """
    options = [
        amqp_url_option,
        state_url_option,
        connect_timeout_option(connect_timeout),
        log_level_option(log_level),
    ]

    def decorate(function: F) -> F:
        function = knob_options()(function)
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def knob_options(*, leaving_out: Collection[str] = ()) -> Callable[[F], F]:
    """Adds the option of every knob but those named in ``leaving_out``;
    :func:`rabbitmq_from` turns what they parsed into a RabbitMQConfig."""

    def decorate(function: F) -> F:
        for knob in reversed(KNOBS):
            if knob.name not in leaving_out:
                function = knob.option()(function)
        return function

    return decorate


def settings_from(options: dict[str, Any], **extra: Any) -> Settings:
    """Takes the settings' options out of ``options`` (the command's keyword arguments).

    ``--log-level`` stays in ``options``: it is not a setting of the store.

    Raises:
        click.UsageError: the values do not fit together (exit code 2).
    """
    return Settings(
        amqp_url=options.pop("amqp_url"),
        state_url=options.pop("state_url"),
        rabbitmq=rabbitmq_from(options),
        connect_timeout=options.pop("connect_timeout"),
        **extra,
    )


def rabbitmq_from(options: dict[str, Any]) -> RabbitMQConfig:
    """Takes the knobs' options out of ``options``; a knob left out keeps its default.

    Raises:
        click.UsageError: the values do not fit together (exit code 2).
    """
    config: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    try:
        for knob in KNOBS:
            if knob.name in options:
                given = knob.value(options.pop(knob.name))
                (limits if knob.in_limits else config)[knob.name] = given
        return RabbitMQConfig(limits=Limits(**limits), **config)
    except ValueError as exc:
        raise click.UsageError(str(exc), ctx=click.get_current_context(silent=True)) from exc
