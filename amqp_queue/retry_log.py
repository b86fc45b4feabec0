"""The log lines of a retried step, named: tenacity's own (``before_sleep_log``) cannot name a
loop body, and said ``Retrying <unknown>`` on every try."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenacity import RetryCallState


def before_sleep(logger: logging.Logger, what: str) -> Callable[[RetryCallState], None]:
    """A ``before_sleep`` for tenacity logging why ``what`` failed and when it runs again: a
    WARNING at its first failure, INFO for the tries after it (an outage is one warning,
    not one every few seconds from every process)."""

    def log(state: RetryCallState) -> None:
        failure = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        level = logging.WARNING if state.attempt_number == 1 else logging.INFO
        logger.log(level, "%s failed (%s); trying again in %.1f s", what, failure, wait)

    return log
