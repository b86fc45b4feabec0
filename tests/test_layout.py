"""The house stays easy to live in: small modules with one job each (issue: one package,
narrow seams)."""

from __future__ import annotations

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
MOST_LINES = 400


def test_no_module_of_the_library_is_over_400_lines() -> None:
    sizes = {
        path.relative_to(REPOSITORY).as_posix(): len(path.read_text().splitlines())
        for folder in ("amqp_queue", "state")
        for path in (REPOSITORY / folder).rglob("*.py")
        # amqp_queue/state is state/ under its installed name: counted once.
        if not path.relative_to(REPOSITORY).as_posix().startswith("amqp_queue/state/")
    }
    assert len(sizes) > 50, "the walk found the library's modules"
    assert {name: lines for name, lines in sizes.items() if lines > MOST_LINES} == {}
