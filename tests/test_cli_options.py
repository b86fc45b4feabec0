"""Every RabbitMQConfig knob and limit is a flag and an environment variable, and the README's
settings table lists them all: parsed in-process with click's runner, no services needed."""

from __future__ import annotations

import os
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from amqp_queue.cli import cli
from amqp_queue.cli.options import KNOBS, Knob, settings_from, settings_options
from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.settings import Settings
from amqp_queue.state.validation import Limits

CONFIGURATION = Path(__file__).resolve().parent.parent / "README.md"

# For each knob: a value other than the default, as typed, and as the config then holds it.
SAMPLES: dict[str, tuple[str, Any]] = {
    "exchange": ("fleet.east", "fleet.east"),
    "queue_type": ("quorum", QueueType.QUORUM),
    "durable": ("false", False),
    "prefetch": ("7", 7),
    "publish_timeout": ("2.5", 2.5),
    "relay_interval": ("4", 4.0),
    "relay_batch": ("9", 9),
    "relay_after": ("0", 0.0),
    "drain_idle": ("0.2", 0.2),
    "recheck_after": ("1.5", 1.5),
    "declare_channels": ("2", 2),
    "declared_cache": ("50", 50),
    "channels_per_connection": ("100", 100),
    "max_connections": ("3", 3),
    "max_message_size": ("1048576", 1_048_576),
    "max_payload_bytes": ("1024", 1024),
    "max_ttl": ("60", timedelta(seconds=60)),
    "max_device_id_length": ("40", 40),
    "max_command_type_length": ("20", 20),
    "max_pending_per_device": ("50", 50),
    "max_reason_length": ("200", 200),
}


def parse(args: list[str], env: dict[str, str] | None = None) -> Settings | click.testing.Result:
    """The Settings a command with the shared options gets, or the run that refused them."""
    parsed: list[Settings] = []

    @click.command()
    @settings_options(connect_timeout=5.0, log_level="warning")
    def probe(log_level: str, **options: Any) -> None:
        parsed.append(settings_from(options))

    # The runner's environment is this process's plus env: ours must not leak in.
    ours: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith("AMQP_QUEUE_") or name == "AMQP_URL"
    }
    result = CliRunner().invoke(probe, args, env={**ours, **(env or {})}, catch_exceptions=False)
    return parsed[0] if parsed else result


def held(config: RabbitMQConfig, name: str) -> Any:
    return getattr(config.limits if name in {f.name for f in fields(Limits)} else config, name)


def flag_args(knob: Knob, text: str) -> list[str]:
    if knob.type is click.BOOL:
        return [f"--no-{knob.flag[2:]}"] if text == "false" else [knob.flag]
    return [knob.flag, text]


def test_every_field_of_the_config_and_of_its_limits_has_an_option() -> None:
    config_fields = {f.name for f in fields(RabbitMQConfig)} - {"limits"}
    limit_fields = {f.name for f in fields(Limits)}

    assert {knob.name for knob in KNOBS} == config_fields | limit_fields
    assert set(SAMPLES) == config_fields | limit_fields


def test_without_flags_or_environment_the_settings_are_the_dataclass_defaults() -> None:
    settings = parse([])

    assert isinstance(settings, Settings)
    assert settings.rabbitmq == RabbitMQConfig()
    assert settings.connect_timeout == 5.0


@pytest.mark.parametrize("knob", KNOBS, ids=lambda knob: knob.name)
def test_a_flag_sets_its_knob(knob: Knob) -> None:
    text, expected = SAMPLES[knob.name]
    settings = parse(flag_args(knob, text))

    assert isinstance(settings, Settings), settings.output
    assert held(settings.rabbitmq, knob.name) == expected


@pytest.mark.parametrize("knob", KNOBS, ids=lambda knob: knob.name)
def test_an_environment_variable_sets_its_knob(knob: Knob) -> None:
    text, expected = SAMPLES[knob.name]
    settings = parse([], env={f"AMQP_QUEUE_{knob.name.upper()}": text})

    assert isinstance(settings, Settings), settings.output
    assert held(settings.rabbitmq, knob.name) == expected


def test_a_flag_wins_over_its_environment_variable() -> None:
    settings = parse(
        ["--prefetch", "3", "--connect-timeout", "1"],
        env={
            "AMQP_QUEUE_PREFETCH": "8",
            "AMQP_QUEUE_CONNECT_TIMEOUT": "9",
        },
    )

    assert isinstance(settings, Settings)
    assert (settings.rabbitmq.prefetch, settings.connect_timeout) == (3, 1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefetch", "0"], "0 is not in the range x>=1"),
        (["--prefetch", "many"], "'many' is not a valid integer"),
        (["--publish-timeout", "nan"], "'nan' is not a finite number"),
        (["--relay-interval", "inf"], "'inf' is not a finite number"),
        (["--recheck-after", "-1"], "-1.0 is not in the range x>=0"),
        (["--max-ttl", "1e300"], "not in the range"),
        (["--connect-timeout", "0"], "0.0 is not in the range x>0"),
        (["--queue-type", "stream"], "'stream' is not one of 'classic', 'quorum'"),
        (["--queue-type", "quorum", "--no-durable"], "quorum queues are always durable"),
        (["--max-payload-bytes", "200000000"], "over what the broker accepts"),
        (["--exchange", "amq.direct"], "AMQP-reserved"),
    ],
)
def test_a_bad_value_is_a_usage_error_naming_it(args: list[str], message: str) -> None:
    result = parse(args)

    assert isinstance(result, click.testing.Result)
    assert result.exit_code == 2
    assert message in result.output


def test_a_bad_environment_value_names_its_variable() -> None:
    result = parse([], env={"AMQP_QUEUE_DURABLE": "perhaps"})

    assert isinstance(result, click.testing.Result)
    assert result.exit_code == 2
    assert "AMQP_QUEUE_DURABLE" in result.output


# demo picks its own exchange (below); migrate touches only the index's schema.
@pytest.mark.parametrize("verb", sorted(set(cli.commands) - {"demo", "migrate"}))
def test_serve_and_every_verb_take_every_setting(verb: str) -> None:
    command = cli.commands[verb]
    # A group of verbs (outcome, rollout): each of its verbs takes them.
    verbs = list(command.commands.values()) if isinstance(command, click.Group) else [command]

    for each in verbs:
        flags = {flag for param in each.params for flag in param.opts}
        for knob in KNOBS:
            assert knob.flag in flags, f"{verb} {each.name} has no {knob.flag}"
        assert {"--amqp-url", "--state-url", "--connect-timeout", "--log-level"} <= flags


def test_the_demo_takes_every_setting_but_the_exchange() -> None:
    flags = {flag for param in cli.commands["demo"].params for flag in param.opts}

    assert {knob.flag for knob in KNOBS} - flags == {"--exchange"}
    assert {"--amqp-url", "--state-url", "--connect-timeout", "--log-level"} <= flags


def _settings_rows() -> list[str]:
    # The README's settings table (the documentation's configuration page includes it).
    text = CONFIGURATION.read_text()
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_the_configuration_page_lists_every_option_of_serve_with_its_variable_and_default() -> None:
    rows = _settings_rows()
    serve = cli.commands["serve"]

    for param in serve.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        [row] = [row for row in rows if f"`{param.opts[0]}`" in row.split(" | ")[1]]
        assert f"`{param.envvar}`" in row
        default = param.default
        if isinstance(default, int | float) and not isinstance(default, bool):
            shown = f"{int(default)}" if float(default).is_integer() else f"{default:g}"
            assert f"`{shown}`" in row, (param.name, row)
        elif isinstance(default, str) and default:
            assert f"`{default}`" in row, (param.name, row)
