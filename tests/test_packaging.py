"""The distribution installs one import package, ``amqp_queue``; ``state`` is not one of them.

PyPI has a package named ``state`` and an application may well have a module of that name:
a top-level ``state`` from this wheel would shadow it or be shadowed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from amqp_queue.console_page import ASSETS

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built as pip builds it for an install: setuptools from the configured index.
    subprocess.run(
        [
            sys.executable,
            *("-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--wheel-dir", str(out), str(REPOSITORY)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (built,) = out.glob("amqp_queue-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {
        name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")
    }

    assert top == {"amqp_queue"}
    assert "amqp_queue/state/model.py" in names
    assert "amqp_queue/state/sql/store.py" in names
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["amqp_queue"]


def test_the_wheel_holds_the_schema_revisions(wheel: Path) -> None:
    """Opening an older database upgrades it with these, from the installed package."""
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = REPOSITORY / "state" / "sql" / "migrations"
    expected = {
        f"amqp_queue/state/sql/migrations/{path.relative_to(migrations).as_posix()}"
        for path in migrations.rglob("*.py")
    }

    assert "amqp_queue/state/sql/migrations/env.py" in expected
    assert len([name for name in expected if "/versions/r" in name]) >= 3
    assert expected <= names


def test_the_wheel_holds_the_console_as_served(wheel: Path) -> None:
    """``serve`` reads the console's files from the installed package."""
    archive = zipfile.ZipFile(wheel)
    for name in ASSETS:
        shipped = archive.read(f"amqp_queue/console/{name}")
        assert shipped == (REPOSITORY / "amqp_queue" / "console" / name).read_bytes(), name


@pytest.mark.slow
def test_import_state_fails_where_only_amqp_queue_is_installed(wheel: Path, tmp_path: Path) -> None:
    # Without PYTHONPATH (a worktree run points it at the checkout): pip would find the
    # checkout's amqp_queue installed, and the probe its state/.
    clean = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=clean)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
        env=clean,
    )
    # Run from an empty folder, so the repository's own state/ is not on the path.
    probe = "import importlib.util as u; print(u.find_spec('state'), u.find_spec('amqp_queue'))"
    found = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    state_spec, package_spec = found.stdout.split(" ", 1)
    assert state_spec == "None"
    assert "site-packages/amqp_queue" in package_spec


def test_the_library_works_on_sqlite_without_the_optional_drivers(tmp_path: Path) -> None:
    # asyncpg and redis come with the postgres and redis extras only: a plain install must
    # import, and serve a SQLite index, without them.
    probe = f"""
import asyncio, sys
sys.modules["asyncpg"] = None
sys.modules["redis"] = None
import amqp_queue, amqp_queue.cli
from amqp_queue.state import open_state

async def main():
    async with await open_state("sqlite+aiosqlite:///{tmp_path / "state.db"}") as state:
        command_id = await state.enqueue("dev-1", b"a", 60)
        print(await state.get_status(command_id))

asyncio.run(main())
"""
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPOSITORY
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "pending"
