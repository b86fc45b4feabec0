"""The public API is what amqp_queue.__all__ says, no more and no less."""

from __future__ import annotations

import importlib

import pytest

import amqp_queue
import state


@pytest.mark.parametrize("module", [amqp_queue, state])
def test_all_names_exist_and_every_public_name_is_exported(module: object) -> None:
    exported = set(module.__all__)  # type: ignore[attr-defined]
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, type(importlib))
    }
    assert exported == public


def test_state_never_imports_amqp_queue() -> None:
    import subprocess
    import sys

    code = "import sys, state, state.sql; print('amqp_queue' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
