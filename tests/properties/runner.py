"""Drives async stores from synchronous hypothesis code on one dedicated event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

Result = TypeVar("Result")

EXAMPLES_VARIABLE = "AMQP_QUEUE_PROPERTY_EXAMPLES"


def property_settings(ci_examples: int, **overrides: Any) -> settings:
    """Settings for a property test: a fixed seed and ``ci_examples`` in CI.

    ``AMQP_QUEUE_PROPERTY_EXAMPLES=<n>`` runs ``n`` examples with a random seed instead (the long
    run); hypothesis prints how to reproduce any failure it finds.
    """
    long_run = os.environ.get(EXAMPLES_VARIABLE)
    options: dict[str, Any] = {
        "max_examples": int(long_run) if long_run else ci_examples,
        "derandomize": not long_run,
        "database": None,
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        **overrides,
    }
    return settings(**options)


class LoopRunner:
    """One event loop for a synchronous caller, and the async context managers opened on it.

    Use it as a context manager; on exit every context entered with :meth:`enter` is exited
    (in reverse order) and the loop is closed.
    """

    def __init__(self) -> None:
        self._runner = asyncio.Runner()
        self._stack = AsyncExitStack()

    def run(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        return self._runner.run(coroutine)

    def enter(self, context: AbstractAsyncContextManager[Result]) -> Result:
        """Enters ``context`` on the loop; it is exited when the runner closes."""
        return self.run(self._stack.enter_async_context(context))

    def close(self) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self._runner.close()

    def __enter__(self) -> LoopRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
