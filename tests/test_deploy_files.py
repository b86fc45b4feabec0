"""The broker configuration in rabbitmq/, docker-compose.yml and the Dockerfile.

No Docker engine is needed: the files are parsed here, and the exchange that definitions.json
declares is declared on the real local broker under a unique name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from amqp_queue.config import RabbitMQConfig
from tests.support import unique

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ = ROOT / "rabbitmq"
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Policy keys that make the broker throw queued commands away (or the whole queue, unlike
# per-message expiry, without dead-lettering); expiry is each command's own TTL.
DROPPING_POLICY_KEYS = {"expires", "message-ttl", "max-length", "max-length-bytes"}
COMPOSE_LINE = re.compile(
    r"""^(?:\ \ )*(?:
        [A-Za-z0-9_.-]+:(?:\ .+)?     # key: or key: value
      | -\ .+                         # list item
    )$""",
    re.VERBOSE,
)
ERLANG_ATOM = r"(?:[a-z][A-Za-z0-9_@]*|'(?:[^'\\]|\\.)+')"
ERLANG_ATOM_LIST = re.compile(
    rf"^\s*\[\s*(?:{ERLANG_ATOM}(?:\s*,\s*{ERLANG_ATOM})*)?\s*\]\s*\.\s*$"
)


def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((RABBITMQ / "definitions.json").read_text())
    return loaded


def the_exchange() -> dict[str, Any]:
    (exchange,) = definitions()["exchanges"]
    assert isinstance(exchange, dict)
    return exchange


def conf_settings() -> dict[str, str]:
    lines = (RABBITMQ / "rabbitmq.conf").read_text().splitlines()
    pairs = (line.split(" = ", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def compose_services() -> dict[str, str]:
    """Each service's block of docker-compose.yml, by name (an indentation-based reading)."""
    services: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_services = False
    for line in compose_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            in_services = line == "services:"
            current = None
        elif in_services and re.fullmatch(r"  [a-z0-9_-]+:", line):
            current = services.setdefault(line.strip().rstrip(":"), [])
        elif in_services and current is not None:
            current.append(line)
    return {name: "\n".join(block) for name, block in services.items()}


def compose_environment(service: str) -> dict[str, str]:
    block = compose_services()[service].split("    environment:\n", 1)[1]
    pairs = re.findall(r"^      ([A-Z0-9_]+): (.+)$", block, re.MULTILINE)
    return dict(pairs)


def test_definitions_declare_the_default_vhost() -> None:
    assert [vhost["name"] for vhost in definitions()["vhosts"]] == ["/"]


def test_definitions_declare_ble_commands_as_a_durable_direct_exchange() -> None:
    exchange = the_exchange()

    assert exchange["name"] == "ble.commands"
    assert exchange["vhost"] == "/"
    assert exchange["type"] == "direct"
    assert exchange["durable"] is True
    assert exchange["auto_delete"] is False
    assert exchange["internal"] is False


def test_definitions_exchange_is_the_one_the_library_uses_by_default() -> None:
    config = RabbitMQConfig()

    assert the_exchange()["name"] == config.exchange
    assert the_exchange()["durable"] == config.durable


def test_definitions_leave_device_queues_and_bindings_to_the_library() -> None:
    assert definitions()["queues"] == []
    assert definitions()["bindings"] == []


def test_no_policy_drops_queued_commands() -> None:
    for policy in definitions()["policies"]:
        assert set(policy["definition"]) & DROPPING_POLICY_KEYS == set(), policy["name"]


def test_policies_apply_to_device_queues_only() -> None:
    config = RabbitMQConfig()
    for policy in definitions()["policies"]:
        pattern = re.compile(policy["pattern"])

        assert policy["apply-to"] == "queues"
        assert pattern.search(config.queue_name("gw-7"))
        assert pattern.search(config.queue_name("sub.gw-7"))
        assert not pattern.search(RabbitMQConfig(exchange="other.commands").queue_name("gw-7"))
        # A longer exchange is another namespace, not more of ours.
        assert not pattern.search(RabbitMQConfig(exchange="ble.commands.sub").queue_name("gw"))


def test_permissions_name_declared_users_and_vhosts() -> None:
    users = {user["name"] for user in definitions()["users"]}
    vhosts = {vhost["name"] for vhost in definitions()["vhosts"]}

    for permission in definitions()["permissions"]:
        assert permission["user"] in users
        assert permission["vhost"] in vhosts


def test_compose_sidecar_logs_in_as_a_declared_user_with_its_password() -> None:
    url = urlsplit(compose_environment("sidecar")["AMQP_URL"])
    (user,) = [user for user in definitions()["users"] if user["name"] == url.username]
    salted = base64.b64decode(user["password_hash"])
    password = (url.password or "").encode()

    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert hashlib.sha256(salted[:4] + password).digest() == salted[4:]


def test_enabled_plugins_is_an_erlang_atom_list_enabling_management() -> None:
    text = (RABBITMQ / "enabled_plugins").read_text()

    assert ERLANG_ATOM_LIST.match(text)
    assert text.rstrip().endswith(".")
    assert "rabbitmq_management" in re.findall(ERLANG_ATOM, text)


def test_rabbitmq_conf_lines_are_key_value_pairs_or_comments() -> None:
    for line in (RABBITMQ / "rabbitmq.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9_.]+ = \S.*", line), line


def test_rabbitmq_conf_loads_definitions_from_where_compose_mounts_them() -> None:
    rabbitmq = compose_services()["rabbitmq"]
    target = conf_settings()["load_definitions"]

    assert f"- ./rabbitmq/definitions.json:{target}:ro" in rabbitmq
    assert conf_settings()["default_vhost"] == "/"
    assert "vm_memory_high_watermark.relative" in conf_settings()


def test_compose_mounts_every_broker_file_into_etc_rabbitmq() -> None:
    rabbitmq = compose_services()["rabbitmq"]
    for name in ("rabbitmq.conf", "enabled_plugins", "definitions.json"):
        assert f"- ./rabbitmq/{name}:/etc/rabbitmq/{name}:ro" in rabbitmq


def test_compose_file_is_block_yaml_of_keys_and_list_items() -> None:
    for line in compose_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert COMPOSE_LINE.match(line), line


def test_compose_defines_every_service_with_a_healthcheck() -> None:
    services = compose_services()

    assert sorted(services) == ["postgres", "rabbitmq", "redis", "sidecar"]
    for name, block in services.items():
        assert "\n    healthcheck:\n" in f"\n{block}\n", name


def test_compose_redis_persists_with_an_append_only_file() -> None:
    assert '"--appendonly", "yes"' in compose_services()["redis"]


def test_compose_sidecar_uses_postgres_state_and_the_definitions_exchange() -> None:
    environment = compose_environment("sidecar")

    assert environment["AMQP_QUEUE_STATE_URL"].startswith("postgresql+asyncpg://")
    assert environment["AMQP_QUEUE_EXCHANGE"] == the_exchange()["name"]
    assert "AMQP_QUEUE_TOKENS" in environment
    assert "build: ." in compose_services()["sidecar"]


def test_dockerfile_installs_extras_the_package_defines() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    assert "FROM python:3.11-slim" in dockerfile
    assert "pip install '.[postgres,redis]'" in dockerfile
    assert {"postgres", "redis"} <= set(extras)


async def test_definitions_exchange_declares_on_the_broker_as_the_library_declares_it() -> None:
    """The exchange from definitions.json, under a unique name, is equivalent to the library's."""
    exchange = the_exchange()
    name = unique("test-defs-")
    config = RabbitMQConfig(exchange=name)
    async with await aio_pika.connect(BROKER_URL) as connection:
        channel = await connection.channel()
        await channel.declare_exchange(
            name,
            aio_pika.ExchangeType(exchange["type"]),
            durable=exchange["durable"],
            auto_delete=exchange["auto_delete"],
            internal=exchange["internal"],
            arguments=exchange["arguments"],
        )
        try:
            await channel.declare_exchange(name, passive=True)
            # A mismatch would close the channel with PRECONDITION_FAILED.
            await channel.declare_exchange(
                name, aio_pika.ExchangeType.DIRECT, durable=config.durable
            )
        finally:
            await channel.exchange_delete(name)
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(name, passive=True)
