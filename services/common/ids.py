"""Ids that clients choose (sessions, users, scenes) end up in file names and
log lines, so one rule for all: 1 to 64 letters, digits, '-' or '_'. No '/',
'..', spaces or control characters can get through."""

from __future__ import annotations

import re
import uuid

from services.common.errors import InvalidInput

VALID_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_id(value: str, what: str, allow_empty: bool = False) -> str:
    if allow_empty and value == "":
        return value
    if not VALID_ID.match(value):
        raise InvalidInput(
            f"{what} {value[:80]!r} is not valid: use 1 to 64 letters, digits, '-' or '_'."
        )
    return value


def new_id() -> str:
    """A fresh id that passes `check_id` (sessions, guesses the gateway names)."""
    return uuid.uuid4().hex[:16]
