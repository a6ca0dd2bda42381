"""Errors engines raise, each carrying a sentence a person understands.

Engines never import grpc; the runtime's interceptor maps these to status
codes in one place (`STATUS_OF`)."""

from __future__ import annotations

import re

import grpc


class TalkerError(Exception):
    """Base class: the message is shown to the caller as the status details."""


class InvalidInput(TalkerError):
    """The request itself is wrong (INVALID_ARGUMENT)."""


class NotFound(TalkerError):
    """An id names nothing that exists (NOT_FOUND)."""


class LimitExceeded(TalkerError):
    """A size, time or queue limit was reached (RESOURCE_EXHAUSTED). With
    `retry_after_s`, the limit is a passing one (the host is busy): the caller
    gets the wait as `retry-after-ms` trailing metadata."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PreconditionFailed(TalkerError):
    """The request is valid but the system cannot serve it as configured (FAILED_PRECONDITION)."""


class StageUnavailable(TalkerError):
    """A model or a downstream stage is not available right now (UNAVAILABLE)."""


STATUS_OF: dict[type[TalkerError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    StageUnavailable: grpc.StatusCode.UNAVAILABLE,
}


# Trailing metadata key of a retry hint: whole milliseconds to wait before trying again.
RETRY_AFTER_KEY = "retry-after-ms"


def retry_trailers(error: BaseException) -> tuple[tuple[str, str], ...]:
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    return ((RETRY_AFTER_KEY, str(round(retry_after_s * 1000))),)


def status_code_for(error: TalkerError) -> grpc.StatusCode:
    # Errors relayed from another program keep the code that program gave.
    code = getattr(error, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


# "<_io.BytesIO object at 0x7f...>": how libraries name an in-memory file in their messages.
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def plain(error: BaseException) -> str:
    """A library's error message fit for a caller: no object addresses, one line."""
    text = " ".join(_OBJECT_REPR.sub("", str(error)).split())
    return text.replace(" :", ":").strip(" .:") or type(error).__name__
