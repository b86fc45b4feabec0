"""Every Python example in the README and in docs/ runs as written, against the real services.

Each fenced ``python`` block is a whole program, run in a fresh folder as a subprocess. The
names it shares with other runs get a namespace of their own first: the exchange
``"ble.commands"``, the PostgreSQL schema ``queue`` and the Redis prefix ``gw:``; the example
hosts ``app@db.internal/commands`` and ``cache.internal`` are pointed at the local services.

A block that cannot run on its own must say so where a reader sees it, in its fence:
```` ```python title="fragment: why" ````. Fragments are counted and listed here
(``FRAGMENTS``), so none escapes unnoticed; keep them rare.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from sqlalchemy.engine import make_url

from amqp_queue.cli import cli
from tests.backends import POSTGRES_URL, REDIS_URL, postgres_schema, redis_prefix
from tests.rabbitmq_support import delete_namespace
from tests.support import unique

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*```(?P<info>\S*)(?P<attrs>.*)$")
FRAGMENT = re.compile(r'title="fragment: (?P<reason>[^"]+)"')

# (page, first line) of every block marked as a fragment; a new one must be added here.
FRAGMENTS: set[tuple[str, str]] = set()

DOC_POSTGRES = "postgresql+asyncpg://app@db.internal/commands"
DOC_REDIS = "redis://cache.internal:6379/0"


@dataclass(frozen=True, slots=True)
class Example:
    """One fenced python block: where it is, its code, and why it cannot run (a fragment)."""

    page: str
    line: int
    code: str
    fragment: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def _examples(page: Path) -> list[Example]:
    found: list[Example] = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        index += 1
        if fence is None:
            continue
        start, body = index, []
        while index < len(lines) and not lines[index].strip().startswith("```"):
            body.append(lines[index])
            index += 1
        index += 1  # the closing fence
        if fence["info"].lower() not in ("python", "py", "python3", "pycon"):
            continue
        indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
        code = "\n".join(line[indent:] for line in body) + "\n"
        reason = FRAGMENT.search(fence["attrs"])
        found.append(
            Example(
                str(page.relative_to(ROOT)),
                start,
                code,
                None if reason is None else reason["reason"],
            )
        )
    return found


EXAMPLES = [example for page in PAGES for example in _examples(page)]
README_PROGRAMS = [e for e in EXAMPLES if e.page == "README.md" and e.fragment is None]
DOCS_PROGRAMS = [e for e in EXAMPLES if e.page != "README.md" and e.fragment is None]


@asynccontextmanager
async def _namespace(code: str) -> AsyncIterator[str]:
    """The program with its shared names made unique, and those names removed afterwards."""
    redis_host = make_url(REDIS_URL).host or "127.0.0.1"
    uses_postgres = DOC_POSTGRES in code
    uses_redis = DOC_REDIS in code or 'host="cache.internal"' in code
    code = code.replace(DOC_POSTGRES, POSTGRES_URL).replace(DOC_REDIS, REDIS_URL)
    code = code.replace('host="cache.internal"', f'host="{redis_host}"')
    assert "db.internal" not in code, "a PostgreSQL host the test cannot point anywhere"
    assert "cache.internal" not in code, "a Redis host the test cannot point anywhere"
    async with AsyncExitStack() as stack:
        if uses_postgres:
            assert 'schema="queue"' in code or "?schema=queue" in code, "PostgreSQL needs a schema"
            schema = await stack.enter_async_context(postgres_schema())
            code = code.replace('schema="queue"', f'schema="{schema}"')
            code = code.replace("?schema=queue", f"?schema={schema}")
        if uses_redis:
            assert 'prefix="gw:"' in code or "?prefix=gw:" in code, "Redis needs a prefix"
            prefix = await stack.enter_async_context(redis_prefix())
            code = code.replace('prefix="gw:"', f'prefix="{prefix}"')
            code = code.replace("?prefix=gw:", f"?prefix={prefix}")
        if "RabbitMQStore" in code:
            assert code.count('"ble.commands"') == 1, "name the exchange once, explicitly"
            exchange = unique("test.docs.")
            code = code.replace('"ble.commands"', f'"{exchange}"')
            devices = sorted(set(re.findall(r'"(gw-[\w.:@-]+)"', code)))
            stack.push_async_callback(delete_namespace, exchange, devices)
        yield code


async def _run(program: str, folder: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        program,
        cwd=folder,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(50):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def test_the_readme_has_its_two_programs() -> None:
    assert len(README_PROGRAMS) == 2


def test_the_docs_have_programs() -> None:
    """A parser that stopped finding blocks would otherwise pass every example test."""
    assert {e.page for e in DOCS_PROGRAMS} >= {"docs/design.md", "docs/stores.md"}


def test_only_the_listed_blocks_are_fragments() -> None:
    fragments = {(e.page, e.code.splitlines()[0]) for e in EXAMPLES if e.fragment}
    for example in EXAMPLES:
        if example.fragment:
            print(f"fragment, not run: {example.name} ({example.fragment})")
    print(f"{len(EXAMPLES) - len(fragments)} programs run, {len(fragments)} fragments")
    assert fragments == FRAGMENTS


async def test_the_usage_program_prints_the_drain_it_promises(tmp_path: Path) -> None:
    (example,) = [e for e in README_PROGRAMS if "SqlStore.connect" in e.code]

    async with _namespace(example.code) as program:
        output = await _run(program, tmp_path)

    assert "[b'reboot', b'21.5', b'door']" in output


async def test_the_rabbitmq_program_drains_then_consumes(tmp_path: Path) -> None:
    (example,) = [e for e in README_PROGRAMS if "RabbitMQStore.connect" in e.code]

    async with _namespace(example.code) as program:
        output = await _run(program, tmp_path)

    assert output.splitlines() == ["gw-7 b'reboot'", "gw-7 b'21.5'", "gw-7 b'blink'"]


@pytest.mark.parametrize("example", DOCS_PROGRAMS, ids=lambda example: example.name)
async def test_every_docs_example_runs(example: Example, tmp_path: Path) -> None:
    """The docs' programs check what they show with their own asserts."""
    async with _namespace(example.code) as program:
        output = await _run(program, tmp_path)

    assert output.strip()


def test_the_configuration_page_includes_the_readmes_settings_table() -> None:
    # Written once, in the README; the documentation site includes it (pymdownx.snippets).
    page = (ROOT / "docs" / "configuration.md").read_text()
    readme = (ROOT / "README.md").read_text()

    assert '--8<-- "README.md:settings"' in page
    assert "<!-- --8<-- [start:settings] -->" in readme
    assert "<!-- --8<-- [end:settings] -->" in readme


def test_the_configuration_table_has_every_setting_as_flag_and_variable() -> None:
    settings = {
        (param.opts[0], param.envvar)
        for command in cli.commands.values()
        for param in command.params
        if isinstance(param, click.Option) and isinstance(param.envvar, str)
    }
    rows = (ROOT / "README.md").read_text().splitlines()

    missing = {
        (flag, variable)
        for flag, variable in settings
        if not any(f"`{flag}`" in row and f"`{variable}`" in row for row in rows)
    }

    assert len(settings) > 20
    assert missing == set()
