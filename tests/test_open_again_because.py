"""Which failures to open a consumer ``open_again_because`` opens again after, and which not."""

from __future__ import annotations

import aiormq.exceptions
import pytest

from amqp_queue.errors import BrokerError, open_again_because


def _failing(cause: BaseException) -> BrokerError:
    error = BrokerError("consuming failed")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "cause",
    [
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
        aiormq.exceptions.ConnectionInternalError(541, "INTERNAL_ERROR"),
        aiormq.exceptions.AMQPConnectionError("Server connection unexpectedly closed"),
        aiormq.exceptions.ChannelInvalidStateError("No active transport in channel"),
        aiormq.exceptions.ChannelNotFoundEntity(404, "NOT_FOUND - no queue 'q' in vhost '/'"),
    ],
)
def test_a_lost_connection_or_a_vanished_queue_is_opened_again(cause: BaseException) -> None:
    assert open_again_because(_failing(cause)) is not None


@pytest.mark.parametrize(
    "cause",
    [
        aiormq.exceptions.ProbableAuthenticationError("ACCESS_REFUSED"),
        aiormq.exceptions.ChannelAccessRefused(403, "ACCESS_REFUSED"),
        aiormq.exceptions.ChannelPreconditionFailed(406, "PRECONDITION_FAILED"),
        aiormq.exceptions.ChannelNotFoundEntity(404, "NOT_FOUND - no exchange 'x'"),
        TimeoutError(),
        RuntimeError("connection closed"),
    ],
)
def test_a_refusal_or_an_unreachable_broker_is_raised(cause: BaseException) -> None:
    assert open_again_because(_failing(cause)) is None
