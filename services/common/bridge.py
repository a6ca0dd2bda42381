"""The one bridge from a blocking engine to an asyncio servicer: a generator
runs on a worker thread and its items come out as an async iterator.

    async with ThreadStream(lambda stop: engine.generate(..., stop)) as items:
        async for item in items:
            yield message_for(item)

Leaving the block early (the caller went away, barge-in, an error) sets
`stop`, and the block is left only once the thread has really finished, so a
work slot held around it is not given back while the engine still runs. An
exception the generator raises comes out of the `async for`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class ThreadStream(Generic[T]):
    def __init__(
        self, produce: Callable[[threading.Event], Iterable[T]], executor: Executor | None = None
    ) -> None:
        self._produce = produce
        self._executor = executor  # None: the loop's default pool
        self.stop = threading.Event()
        self._items: asyncio.Queue[object] = asyncio.Queue()
        self._worker: asyncio.Future[None] | None = None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for item in self._produce(self.stop):
                loop.call_soon_threadsafe(self._items.put_nowait, item)
                if self.stop.is_set():
                    return
        finally:
            loop.call_soon_threadsafe(self._items.put_nowait, _DONE)

    async def __aenter__(self) -> ThreadStream[T]:
        loop = asyncio.get_running_loop()
        self._worker = loop.run_in_executor(self._executor, self._run, loop)
        return self

    def __aiter__(self) -> ThreadStream[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._items.get()
        if item is _DONE:
            assert self._worker is not None
            await self._worker  # re-raises what the engine raised
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop.set()
        if self._worker is not None:
            try:
                # Shielded: a cancelled caller still waits for the engine to be idle.
                await asyncio.shield(self._worker)
            except Exception:
                if error is None:
                    raise  # else the error that ended the block is the one to report
