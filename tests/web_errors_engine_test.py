"""Engine ring: how the web program turns a gateway status into HTTP."""

from __future__ import annotations

import grpc
from grpc import aio

from services.common.errors import RETRY_AFTER_KEY
from web.errors import error_response, from_grpc


def status(code: grpc.StatusCode, details: str, trailers: tuple = ()) -> aio.AioRpcError:  # type: ignore[type-arg]
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(*trailers), details)


def test_a_busy_gateway_becomes_429_with_retry_after() -> None:
    busy = status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "This talker is busy: it is already holding 2 conversations. Try again in 5 s.",
        ((RETRY_AFTER_KEY, "4500"),),
    )
    error = from_grpc(busy, "the gateway")
    assert error.status == 429 and error.retry_after_s == 4.5
    response = error_response(
        error.status, str(error), error.code, retry_after_s=error.retry_after_s
    )
    assert response.headers["Retry-After"] == "5"  # whole seconds, rounded up


def test_a_limit_of_the_request_has_no_retry_after() -> None:
    too_long = status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "The question audio is 90.0 s long; at most 60 s are accepted.",
    )
    error = from_grpc(too_long, "the gateway")
    assert error.status == 413 and error.retry_after_s is None
    assert "Retry-After" not in error_response(error.status, str(error)).headers
