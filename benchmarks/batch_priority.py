"""Batch work beside interactive work, on the real default model, in one process.

    python benchmarks/batch_priority.py --num-batch 64 --output-len 32 --interactive 12 --repeats 3

Two questions (issue 20's targets):
1. Throughput: the batch path (tokenmill.batch's runner through the server's handlers, results
   fsynced line by line, priority 100) against the engine alone (every request submitted at
   once to AsyncEngine.generate): rows/s and output tok/s, and their ratio (target >= 0.9).
2. Interactive TTFT: requests arriving one every --interval seconds, alone, then while a batch
   runs at priority 100 (batch yields), then while the same batch runs at priority 0 (no
   priority: interactive waits behind the batch). p50 and p99 of each (target: p50 with the
   low-priority batch within 1.5x of alone).
Medians over --repeats runs; print JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from tokenmill.batch.format import BatchLine
from tokenmill.batch.results import ResultFiles
from tokenmill.batch.runner import run_lines
from tokenmill.build import build_async_engine
from tokenmill.config import EngineConfig
from tokenmill.sampling import SamplingParams
from tokenmill.server.batch_calls import BatchCalls
from tokenmill.server.served import ServedModels

MODEL = "smollm2"


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(n)]


async def engine_alone(engine, batch: list[list[int]], output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def one(i, ids):
        async for _ in engine.generate(ids, params, f"alone-{time.monotonic_ns()}-{i}", priority=100):
            pass

    t = time.perf_counter()
    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))
    return time.perf_counter() - t


async def batch_path(calls: BatchCalls, batch: list[list[int]], output_len: int, concurrency: int) -> float:
    lines = [BatchLine(i + 1, f"row-{i}", "/v1/completions",
                       {"prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True})
             for i, ids in enumerate(batch)]
    with tempfile.TemporaryDirectory() as tmp, ResultFiles(Path(tmp) / "out.jsonl") as results:
        t = time.perf_counter()
        await run_lines(lines, [], calls, results, concurrency)
        elapsed = time.perf_counter() - t
        assert results.num_completed == len(lines), (results.num_completed, results.num_failed)
    return elapsed


async def ttfts(engine, interactive: list[list[int]], interval: float) -> list[float]:
    """Time to first token of requests arriving one every `interval` seconds (priority 0)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def one(i, ids) -> float:
        t, first = time.perf_counter(), None
        async for o in engine.generate(ids, params, f"chat-{time.monotonic_ns()}-{i}"):
            if first is None and o.outputs[0].token_ids:
                first = time.perf_counter() - t
        return first

    tasks = []
    for i, ids in enumerate(interactive):
        tasks.append(asyncio.create_task(one(i, ids)))
        await asyncio.sleep(interval)
    return list(await asyncio.gather(*tasks))


async def ttfts_beside_batch(engine, interactive, interval, batch, output_len, priority) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def bg(i, ids):
        async for _ in engine.generate(ids, params, f"bg-{time.monotonic_ns()}-{i}", priority=priority):
            pass

    background = [asyncio.create_task(bg(i, ids)) for i, ids in enumerate(batch)]
    await asyncio.sleep(1.0)  # the batch fills the engine first
    result = await ttfts(engine, interactive, interval)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    return result


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def main_async(args) -> dict:
    engine = build_async_engine(EngineConfig.from_flat(model=MODEL, max_num_seqs=args.max_num_seqs))
    models = ServedModels([MODEL])
    models.attach(MODEL, engine)
    calls = BatchCalls(models)
    batch = prompts(args.num_batch, args.input_len, 0)
    interactive = prompts(args.interactive, args.input_len, 1)
    await engine_alone(engine, batch[:2], 4)  # warm-up
    runs: dict[str, list] = {"engine_alone_s": [], "batch_path_s": [], "ttft_alone": [], "ttft_batch_prio100": [],
                             "ttft_batch_prio0": []}
    for _ in range(args.repeats):
        runs["engine_alone_s"].append(await engine_alone(engine, batch, args.output_len))
        runs["batch_path_s"].append(await batch_path(calls, batch, args.output_len, args.concurrency))
        runs["ttft_alone"].append(await ttfts(engine, interactive, args.interval))
        big = batch * 4
        runs["ttft_batch_prio100"].append(await ttfts_beside_batch(engine, interactive, args.interval, big,
                                                                   args.output_len, 100))
        runs["ttft_batch_prio0"].append(await ttfts_beside_batch(engine, interactive, args.interval, big,
                                                                 args.output_len, 0))
    engine.shutdown()
    tokens = args.num_batch * args.output_len
    alone = statistics.median(runs["engine_alone_s"])
    path = statistics.median(runs["batch_path_s"])
    report = {
        "engine_alone": {"rows_per_s": args.num_batch / alone, "output_tok_per_s": tokens / alone},
        "batch_path": {"rows_per_s": args.num_batch / path, "output_tok_per_s": tokens / path},
        "batch_vs_engine_alone": alone / path,
    }
    for key in ("ttft_alone", "ttft_batch_prio100", "ttft_batch_prio0"):
        report[key] = {"p50_ms": 1000 * statistics.median(pct(r, 0.5) for r in runs[key]),
                       "p99_ms": 1000 * statistics.median(pct(r, 0.99) for r in runs[key])}
    report["ttft_p50_ratio_prio100_vs_alone"] = report["ttft_batch_prio100"]["p50_ms"] / report["ttft_alone"]["p50_ms"]
    report["ttft_p50_ratio_prio0_vs_alone"] = report["ttft_batch_prio0"]["p50_ms"] / report["ttft_alone"]["p50_ms"]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--interactive", type=int, default=12)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    print(json.dumps(asyncio.run(main_async(ap.parse_args())), indent=2))


if __name__ == "__main__":
    main()
