"""Run a batch's lines through an `Execute` with bounded concurrency, writing each result.

The bound matters twice: the engine's waiting queue is bounded (a batch must never fill it
and turn interactive requests away with 429s), and the engine batches best with enough
requests in flight to fill every sequence slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

from tokenmill.batch.format import BatchLine, LineError, error_line, response_line
from tokenmill.batch.results import ResultFiles, result_key

# (url, body) -> (HTTP status, response body): one request as the server would answer it.
Execute = Callable[[str, dict], Awaitable[tuple[int, dict]]]


async def run_lines(
    lines: list[BatchLine], errors: list[LineError], execute: Execute, results: ResultFiles,
    concurrency: int = 64, progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Write every line's result, skipping those `results` already holds. Cancelling this
    coroutine cancels the requests in flight; their lines stay undone, to run on resume."""
    for error in errors:
        if not results.is_done(result_key(error_line(error))):
            results.write(error_line(error))
            progress(1)
    todo: Iterator[BatchLine] = iter([line for line in lines if not results.is_done(line.custom_id)])

    async def worker() -> None:
        for line in todo:  # one shared iterator: each line is taken by exactly one worker
            status, body = await execute(line.url, line.body)
            results.write(response_line(line.custom_id, status, body))
            progress(1)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
