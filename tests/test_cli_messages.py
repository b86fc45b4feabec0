"""What the CLI and the API say reads right (issue 16, item 5): an over-long TTL in seconds and
days, a state URL naming a missing database as such (not a failed write, no SQLAlchemy link),
and ``drain`` listing what it delivered as delivered."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from amqp_queue import StateError
from amqp_queue.state import open_state
from tests.api_support import Api, running
from tests.backends import POSTGRES_URL
from tests.rabbitmq_support import delete_namespace
from tests.support import unique
from tests.test_cli import Cli

OVER_MAXIMUM = "ttl of 2,678,400 s is over the maximum of 2,592,000 s (30 days)"


def _missing_postgres_database() -> str:
    """The test server's URL with a password (to see it hidden) and a database it lacks."""
    url = make_url(POSTGRES_URL).set(password="s3cret", database=unique("missing_"))
    return url.render_as_string(hide_password=False)


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    runner = Cli(tmp_path)
    yield runner
    await delete_namespace(runner.exchange, ["gw-1"])


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running(tmp_path) as opened:
        yield opened


def test_an_over_maximum_ttl_says_the_limit_in_seconds_and_days(cli: Cli) -> None:
    result = cli.run("enqueue", "gw-1", "x", "--ttl", "2678400")

    assert result.returncode == 2
    assert result.stderr.strip() == f"amqp-queue: error: {OVER_MAXIMUM}"


async def test_an_over_maximum_ttl_over_http_says_the_same(api: Api) -> None:
    response = await api.enqueue("dev-1", ttl=2_678_400)

    assert response.status_code == 400
    assert response.json() == {"error": "invalid_input", "detail": OVER_MAXIMUM}


@pytest.mark.parametrize(
    "verb", [["pending", "gw-1"], ["status", "00000000-0000-0000-0000-000000000042"]]
)
def test_a_read_from_a_missing_postgres_database_names_the_database(
    cli: Cli,
    verb: list[str],
) -> None:
    url = _missing_postgres_database()
    database = make_url(url).database

    result = cli.run(*verb, "--state-url", url)

    assert result.returncode == 1
    shown = url.replace(":s3cret@", ":***@")
    assert result.stderr.strip() == (
        f'amqp-queue: error: cannot open the state index at {shown}: database "{database}" '
        "does not exist"
    )


def test_a_read_from_a_sqlite_file_in_a_missing_directory_names_the_file(
    cli: Cli,
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'state.db'}"

    result = cli.run("pending", "gw-1", "--state-url", url)

    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"amqp-queue: error: cannot open the state index at {url}: unable to open database file"
    )


async def test_opening_a_missing_database_is_a_state_error_without_sqlalchemy_noise() -> None:
    with pytest.raises(StateError) as raised:
        await open_state(_missing_postgres_database())

    message = str(raised.value)
    assert message.startswith("cannot open the state index at postgresql+asyncpg://")
    assert "does not exist" in message
    assert "s3cret" not in message
    assert "write failed" not in message
    assert "sqlalche.me" not in message


def test_drain_lists_what_it_delivered_as_delivered(cli: Cli) -> None:
    plain = cli.run("enqueue", "gw-1", "reboot").stdout.strip()
    unlock = cli.json("enqueue", "gw-1", "door", "--mode", "confirm", "--type", "unlock")["id"]
    cli.json("confirm", unlock)
    listed = cli.run("pending", "gw-1")

    drained = cli.run("drain", "gw-1")

    assert [line.split()[2] for line in listed.stdout.splitlines()] == ["ready", "ready"]
    assert drained.returncode == 0, drained.stderr
    lines = drained.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [plain, unlock]
    assert [line.split()[2] for line in lines] == ["delivered", "delivered"]
    assert cli.json("status", plain)["status"] == "delivered"
