"""The public API is what amqp_queue.__all__ says, no more and no less."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import amqp_queue
import amqp_queue.state as state


@pytest.mark.parametrize("module", [amqp_queue, state])
def test_all_names_exist_and_every_public_name_is_exported(module: object) -> None:
    exported = set(module.__all__)  # type: ignore[attr-defined]
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, type(importlib))
    }
    assert exported == public


def test_the_state_layer_never_imports_the_delivery_side() -> None:
    """state/ (installed as amqp_queue.state) imports only itself, relatively, and libraries:
    never amqp_queue's delivery modules, so it stays a layer of its own."""
    root = Path(state.__file__).resolve().parent
    for path in root.rglob("*.py"):
        depth = len(path.relative_to(root).parts) - 1
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= depth + 1, f"{path}: import climbs out of state/"
                assert node.level or not (node.module or "").startswith(("amqp_queue", "state")), (
                    f"{path}: state imports itself relatively, never by package name"
                )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("amqp_queue", "state")), path


def test_nothing_imports_the_state_folder_as_a_top_level_package() -> None:
    """In the repository state/ is also importable as ``state``; a module imported under both
    names would exist twice, with two sets of exception classes."""
    repository = Path(__file__).resolve().parents[1]
    for folder in ("amqp_queue", "tests", "bench"):
        for path in (repository / folder).rglob("*.py"):
            if "amqp_queue/state" in path.as_posix():
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                assert not any(name == "state" or name.startswith("state.") for name in names), (
                    f"{path} imports the top-level state package"
                )
