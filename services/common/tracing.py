"""Trace ids: the `x-trace-id` metadata key, carried in a contextvar so every
log line written while serving a call names the call it belongs to."""

from __future__ import annotations

import contextvars
import re
import uuid

TRACE_METADATA_KEY = "x-trace-id"

# What a client may send: short, printable, no separators that could smuggle
# a path or a log-injection; anything else is replaced by a fresh id.
_VALID_TRACE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

current_trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="")


def new_trace_id() -> str:
    return uuid.uuid4().hex


def accept_trace_id(candidate: str | None) -> str:
    """The client's trace id when it is well-formed, else a new one."""
    if candidate and _VALID_TRACE_ID.match(candidate):
        return candidate
    return new_trace_id()


def trace_id_from_metadata(metadata: object) -> str | None:
    """The `x-trace-id` value from gRPC invocation metadata, if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == TRACE_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None
