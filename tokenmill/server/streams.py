"""Running engine requests for one HTTP call: start them, merge their outputs, stop on disconnect.

Errors the engine raises on admission (a bad prompt, a full queue) surface on the generator's
first item, so every request's first output is awaited before the HTTP response starts; that
way they become a proper 400/429 instead of a broken stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request

from tokenmill.engine.async_engine import EngineDeadError, QueueFullError, RequestFailedError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams
from tokenmill.server.errors import APIError

T = TypeVar("T")

# A hint for clients told to back off; a step is well under a second, a queue drains in a few.
RETRY_AFTER_SECONDS = "1"


class ClientGone(Exception):
    """The client disconnected before we answered; nothing is left to send."""


Started = list[tuple[AsyncGenerator[RequestOutput, None], RequestOutput]]


async def start_requests(
    engine, prompts: list[list[int]], params: SamplingParams, base_id: str, priority: int = 0
) -> Started:
    """Submit every prompt at once (they prefill in the same steps) and wait for each one's
    first output. On any failure all of them are aborted and the error is mapped to HTTP."""
    gens = [engine.generate(ids, params, f"{base_id}-{i}", priority=priority) for i, ids in enumerate(prompts)]
    firsts = await asyncio.gather(*(anext(g) for g in gens), return_exceptions=True)
    failure = next((r for r in firsts if isinstance(r, BaseException)), None)
    if failure is None:
        return list(zip(gens, firsts))
    for g in gens:
        await g.aclose()
    if isinstance(failure, QueueFullError):
        raise APIError(429, f"server busy: {failure}; retry later", code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(failure, ValueError):
        raise APIError(400, str(failure))
    raise engine_failure(failure)


def engine_failure(exc: BaseException) -> BaseException:
    """An engine error as the HTTP error it is: this request failed (500), or the engine did
    (503: the process must restart). Anything else is unexpected and stays as it is."""
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="request_failed")
    return exc


async def close_all(started: Started) -> None:
    for gen, _ in started:
        await gen.aclose()


async def merged(started: Started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (prompt index, cumulative output) from all requests as they come. Closing this
    iterator early aborts every request that is still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator, first: RequestOutput) -> None:
        try:
            await queue.put((i, first))
            if not first.finished:
                async for out in gen:
                    await queue.put((i, out))
        except Exception as exc:  # engine failure: hand it to the consumer
            await queue.put((i, engine_failure(exc)))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g, first)) for i, (g, first) in enumerate(started)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(started)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it (which aborts its engine requests) if the client leaves."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone()
    return task.result()
