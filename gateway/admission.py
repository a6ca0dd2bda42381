"""Admission control: the gateway holds at most `capacity` calls that run
turns at once (Converse calls for their whole life, Ask calls for their one
turn). The next caller is refused at once with RESOURCE_EXHAUSTED, a sentence
and a retry hint, instead of being let in to slow every conversation already
going: on a small host each extra conversation queues behind the others at
every stage (one chat reply at a time, one Whisper decode at a time)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge

from services.common.errors import LimitExceeded

ACTIVE = Gauge(
    "talker_gateway_conversations_active",
    "Calls holding an admission slot now, by kind (converse, ask).",
    ["kind"],
)
REFUSED = Counter(
    "talker_gateway_conversations_refused_total",
    "Calls refused because the gateway was full, by kind (converse, ask).",
    ["kind"],
)
CAPACITY = Gauge(
    "talker_gateway_conversations_capacity",
    "Calls the gateway admits at once (TALKER_GATEWAY_MAX_CONVERSATIONS).",
)


class Admission:
    """Counts slots on the gateway's one event loop: a check and its increment
    never have an await between them, so no lock is needed."""

    def __init__(self, capacity: int, retry_after_s: float) -> None:
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.active: dict[str, int] = {"converse": 0, "ask": 0}
        CAPACITY.set(capacity)

    @property
    def held(self) -> int:
        return sum(self.active.values())

    @contextmanager
    def slot(self, kind: str) -> Iterator[None]:
        """Holds one slot for the body; refuses with LimitExceeded (and a retry hint) when full."""
        if self.held >= self.capacity:
            REFUSED.labels(kind).inc()
            raise LimitExceeded(
                f"This talker is busy: it is already holding {self.held} conversations, "
                f"as many as it can serve without slowing them down. Try again in "
                f"{self.retry_after_s:g} s.",
                retry_after_s=self.retry_after_s,
            )
        self.active[kind] += 1
        ACTIVE.labels(kind).set(self.active[kind])
        try:
            yield
        finally:
            self.active[kind] -= 1
            ACTIVE.labels(kind).set(self.active[kind])
