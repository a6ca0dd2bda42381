"""Server-side conversation history: bounded per session, sessions expire
when idle, and their number is capped."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from services.common.errors import LimitExceeded


@dataclass
class Message:
    role: str  # "user" | "assistant"
    text: str
    token_count: int
    created: float = field(default_factory=time.time)


@dataclass
class Session:
    session_id: str
    user_id: str = ""
    messages: list[Message] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    # One reply at a time per session: a second message waits for the first.
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The id of the speculative call that made the last exchange ("" if none):
    #: that exchange may still be taken back.
    speculative_tail: str = ""
    #: The first history message of the last prompt: the next prompt starts there
    #: too while it can, so the model's cache of the last prompt stays usable.
    prompt_start: Message | None = None

    @property
    def token_count(self) -> int:
        return sum(m.token_count for m in self.messages)

    def add_exchange(
        self, user: Message, reply: Message, max_turns: int, speculation_id: str = ""
    ) -> None:
        self.messages += [user, reply]
        del self.messages[: max(0, len(self.messages) - 2 * max_turns)]
        self.speculative_tail = speculation_id
        self.touch()

    def discard_speculative(self, speculation_id: str) -> bool:
        """Takes back the last exchange if the speculative call `speculation_id` made it."""
        if not speculation_id or self.speculative_tail != speculation_id:
            return False
        del self.messages[-2:]
        self.speculative_tail = ""
        return True

    def touch(self) -> None:
        self.updated = time.time()
        self.last_used = time.monotonic()


class SessionStore:
    def __init__(self, max_sessions: int, ttl_s: float) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        self.expire()
        session = self._sessions.get(session_id)
        if session is not None:
            self._sessions.move_to_end(session_id)
        return session

    def get_or_create(self, session_id: str, user_id: str) -> Session:
        session = self.get(session_id)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                raise LimitExceeded(
                    f"Chat holds {self.max_sessions} live sessions, its limit; reset an old "
                    "session or try again when idle ones expire."
                )
            session = self._sessions[session_id] = Session(session_id)
        if user_id:
            session.user_id = user_id
        session.touch()
        return session

    def reset(self, session_id: str) -> tuple[bool, int]:
        session = self._sessions.pop(session_id, None)
        return (session is not None, len(session.messages) if session else 0)

    def expire(self) -> int:
        """Drops sessions idle past the TTL (never one that is answering)."""
        cutoff = time.monotonic() - self.ttl_s
        stale = [
            sid for sid, s in self._sessions.items() if s.last_used < cutoff and not s.busy.locked()
        ]
        for sid in stale:
            del self._sessions[sid]
        return len(stale)
