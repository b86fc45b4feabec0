"""The broker configuration in rabbitmq/, docker-compose.yml and the Dockerfile.

No Docker engine is needed: the files are parsed here, and the exchange that definitions.json
declares is declared on the real local broker under a unique name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
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


def _generated(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(RABBITMQ / "definitions.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_definitions_json_is_the_generators_output_for_the_default_exchange() -> None:
    """So the committed file and rabbitmq/definitions.py cannot drift apart; the salt of the
    committed password hash makes the output reproducible."""
    (user,) = definitions()["users"]
    salt = base64.b64decode(user["password_hash"])[:4].hex()

    assert _generated("--salt", salt) == (RABBITMQ / "definitions.json").read_text()


def test_the_sidecar_user_has_no_tag_and_only_its_exchange_and_device_queues() -> None:
    (user,) = definitions()["users"]
    (permission,) = definitions()["permissions"]
    config = RabbitMQConfig()
    others = [
        "other.commands",
        "other.commands/gw-7",
        f"{config.exchange}.sub",
        f"{config.exchange}.sub/gw-7",
        f"x{config.queue_name('gw-7')}",
        "amq.default",
        "amq.direct",
        "",
    ]

    assert user["tags"] == []
    for kind in ("configure", "write", "read"):
        allowed = re.compile(permission[kind])
        for name in (config.exchange, config.queue_name("gw-7"), config.queue_name("sub.gw-7")):
            assert allowed.search(name), (kind, name)
        for name in others:
            assert not allowed.search(name), (kind, name)


@pytest.mark.parametrize("vhost", ["/", "tenant-a"])
def test_generated_definitions_follow_the_exchange_and_vhost(vhost: str) -> None:
    generated = json.loads(_generated("--exchange", "acme.cmds", "--vhost", vhost))
    config, default = RabbitMQConfig(exchange="acme.cmds"), RabbitMQConfig()
    (policy,) = generated["policies"]
    (permission,) = generated["permissions"]
    (exchange,) = generated["exchanges"]

    assert exchange["name"] == "acme.cmds"
    assert re.search(policy["pattern"], config.queue_name("gw-7"))
    assert not re.search(policy["pattern"], default.queue_name("gw-7"))
    assert re.search(permission["read"], config.queue_name("gw-7"))
    assert not re.search(permission["read"], default.queue_name("gw-7"))
    assert generated["vhosts"] == [{"name": vhost}]
    for entry in (policy, permission, exchange):
        assert entry["vhost"] == vhost


def test_the_generator_refuses_a_reserved_exchange() -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        _generated("--exchange", "amq.direct")

    assert "AMQP-reserved" in refused.value.stderr


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
    assert 'pip install "./[postgres,redis]"' in dockerfile
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
