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
        for pattern in ("*.py", "*.js")  # the console's scripts too
        for path in (REPOSITORY / folder).rglob(pattern)
        # amqp_queue/state is state/ under its installed name: counted once.
        if not path.relative_to(REPOSITORY).as_posix().startswith("amqp_queue/state/")
    }
    assert len(sizes) > 50, "the walk found the library's modules"
    assert {name: lines for name, lines in sizes.items() if lines > MOST_LINES} == {}


def test_the_state_layer_speaks_of_an_outbox_not_of_a_broker() -> None:
    # errors.py draws the whole exception tree, the delivery side's branches included.
    speaking = {
        path.relative_to(REPOSITORY).as_posix(): [
            number
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if "broker" in line.lower() or "rabbitmq" in line.lower()
        ]
        for path in (REPOSITORY / "state").rglob("*.py")
        if path.name != "errors.py"
    }
    assert len(speaking) > 40, "the walk found the state layer's modules"
    assert {name: lines for name, lines in speaking.items() if lines} == {}
