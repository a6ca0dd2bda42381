"""HTTP errors of the web program: OpenAI-style JSON bodies, and the HTTP status
of each gRPC status code a downstream call can end with."""

from __future__ import annotations

import math

import grpc
from aiohttp import web

from services.common.errors import RETRY_AFTER_KEY

# OpenAI's error `type` for each HTTP status we send.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    416: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    retry_after_s: float | None = None,
) -> web.Response:
    """An error as OpenAI-style JSON: what tools that speak that API already parse.
    A retry hint becomes the standard `Retry-After` header (whole seconds)."""
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(
                status, "invalid_request_error" if status < 500 else "server_error"
            ),
            "param": param,
            "code": code,
        }
    }
    headers = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s else None
    return web.json_response(body, status=status, headers=headers)


class HttpError(Exception):
    """Raised by handlers: becomes `error_response(status, message, code, param)`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s


# gRPC status -> HTTP status. The sentence the service gave is kept as the message.
HTTP_STATUS_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def from_grpc(error: grpc.aio.AioRpcError, what: str) -> HttpError:
    """A failed downstream call as an HTTP error; `what` names the service for
    codes that carry no sentence of their own (a stage that is down)."""
    code = error.code()
    status = HTTP_STATUS_OF.get(code, 502)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most" in (error.details() or ""):
        # A size limit ("...; at most N are accepted"), not a busy server: retrying
        # the same request cannot help, so not 429 (which OpenAI clients retry).
        status = 413
    details = error.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and "unavailable" not in details.lower():
        details = f"{what} is unavailable: {details}"
    # The gateway's admission refusal says when to come back (`retry-after-ms` trailer).
    hint = dict(error.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
    retry_after_s = int(hint) / 1000 if hint and str(hint).isdigit() else None
    return HttpError(status, details, code.name.lower(), retry_after_s=retry_after_s)
