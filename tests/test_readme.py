"""The README's programs run as written (a user's first hour starts by pasting them).

Each ``python`` block that is a whole program (it ends in ``asyncio.run``) runs in a fresh
folder against the real broker, with its exchange renamed so that it gets a namespace of its
own; its output must show what the README says it does.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.rabbitmq_support import delete_namespace
from tests.support import unique

README = Path(__file__).resolve().parents[1] / "README.md"
PROGRAMS = [
    block
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    if "asyncio.run(" in block
]


def _run(program: str, folder: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_readme_has_its_two_programs() -> None:
    assert len(PROGRAMS) == 2


def test_the_usage_program_prints_the_drain_it_promises(tmp_path: Path) -> None:
    (program,) = [block for block in PROGRAMS if "SqlStore.connect" in block]

    output = _run(program, tmp_path)

    assert "[b'reboot', b'21.5', b'door']" in output


async def test_the_rabbitmq_program_drains_then_consumes(tmp_path: Path) -> None:
    (program,) = [block for block in PROGRAMS if "RabbitMQStore.connect" in block]
    exchange = unique("test.readme.")
    assert program.count('"ble.commands"') == 1
    try:
        output = _run(program.replace('"ble.commands"', f'"{exchange}"'), tmp_path)
    finally:
        await delete_namespace(exchange, ["gw-7"])

    assert output.splitlines() == ["gw-7 b'reboot'", "gw-7 b'21.5'", "gw-7 b'blink'"]
