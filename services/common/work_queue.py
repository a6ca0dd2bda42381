"""A bounded wait for scarce model capacity: at most `workers` jobs run, at
most `max_waiting` wait; the next caller is refused at once instead of piling up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from services.common.errors import LimitExceeded
from services.common.metrics import QUEUE_DEPTH


class WorkQueue:
    def __init__(self, name: str, workers: int, max_waiting: int) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(workers)
        self._waiting = 0
        self._gauge = QUEUE_DEPTH.labels(name)
        #: Called with True when the queue fills and False when it has room again
        #: (the runtime reports NOT_SERVING meanwhile).
        self.on_saturation: Callable[[bool], Awaitable[None]] | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def full(self) -> bool:
        return self._waiting >= self.max_waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one worker slot for the body; refuses with LimitExceeded when the queue is full."""
        if self._slots.locked() and self.full:
            raise LimitExceeded(
                f"The {self.name} queue is full ({self.max_waiting} requests waiting); "
                "try again in a moment."
            )
        await self._count_waiting(+1)
        try:
            await self._slots.acquire()
        finally:
            await self._count_waiting(-1)
        try:
            yield
        finally:
            self._slots.release()

    async def _count_waiting(self, change: int) -> None:
        was_full = self.full
        self._waiting += change
        self._gauge.set(self._waiting)
        if self.on_saturation is not None and self.full != was_full:
            await self.on_saturation(self.full)
