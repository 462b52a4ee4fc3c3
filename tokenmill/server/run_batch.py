"""`tokenmill run-batch`: an OpenAI batch file through an in-process engine, no HTTP.

Resumable: results already in the output file (by custom_id) are skipped and the rest are
appended, so rerunning after a crash or Ctrl-C finishes the job with each id answered once.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path

from tokenmill.batch.format import parse_lines
from tokenmill.batch.results import ResultFiles
from tokenmill.batch.runner import run_lines
from tokenmill.engine.async_embedder import AsyncEmbedder
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.batch_calls import URLS, BatchCalls, check_lines
from tokenmill.server.served import ServedModels


def _progress_bar(total: int, initial: int):
    """tqdm when installed, else one line rewritten in place: returns (advance, close)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, initial=initial, unit="req", file=sys.stderr)
        return bar.update, bar.close
    done = [initial]

    def advance(n: int) -> None:
        done[0] += n
        print(f"\rrun-batch: {done[0]}/{total}", end="", file=sys.stderr, flush=True)

    return advance, lambda: print(file=sys.stderr)


Engines = Mapping[str, AsyncEngine | AsyncEmbedder]  # name lines give -> its engine (an LLM or an embedder)


async def run_batch_file(
    engines: Engines, input_path: Path, output_path: Path, concurrency: int = 64, progress: bool = True,
) -> tuple[int, int]:
    """Run every line of `input_path` not yet answered in `output_path`; (completed, failed) in
    the output. Lines are routed by their `model` as the server routes them."""
    models = ServedModels(list(engines))
    for name, engine in engines.items():
        engine.start()  # both kinds start once: a second start does nothing
        models.attach(name, engine)
    # Offline there is no interactive traffic to yield to: each line runs at the priority it asks.
    calls = BatchCalls(models, priority=None)
    parsed, bad = parse_lines(Path(input_path).read_text(encoding="utf-8").splitlines(), URLS)
    lines, invalid = check_lines(calls, parsed)
    with ResultFiles(Path(output_path)) as results:
        initial = len(results.done)
        advance, close = _progress_bar(len(parsed) + len(bad), initial) if progress else (lambda n: None, lambda: None)
        try:
            await run_lines(lines, bad + invalid, calls, results, concurrency, advance)
        finally:
            close()
        return results.num_completed, results.num_failed


def run_batch(engines: Engines, input_path: str, output_path: str, concurrency: int) -> int:
    try:
        completed, failed = asyncio.run(run_batch_file(engines, Path(input_path), Path(output_path), concurrency))
    finally:
        for engine in engines.values():
            engine.shutdown()
    print(f"run-batch: {completed} completed, {failed} failed -> {output_path}", file=sys.stderr)
    return 0
