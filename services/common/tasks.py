"""Running asyncio tasks side by side and ending them cleanly: the pieces of a
turn's reply, a call's readers, and the events they put out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from typing import Any


async def all_or_none(work: Sequence[Awaitable[None]]) -> None:
    """Runs the stages side by side; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    finally:
        await cancel_and_wait(*tasks)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels the tasks and returns once they have all ended, however they end."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


_END = object()


async def stream_events(
    events: asyncio.Queue[Any], work: Coroutine[Any, Any, None]
) -> AsyncIterator[Any]:
    """Runs `work`, which puts events on `events`, and yields them as they come.
    What `work` raises is raised here, after the events put before it; leaving
    the loop early (the client went away) cancels `work`."""

    async def run() -> None:
        try:
            await work
        except Exception as error:
            events.put_nowait(error)
        finally:
            events.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        while (item := await events.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await cancel_and_wait(task)
