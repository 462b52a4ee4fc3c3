"""Batch work against its peers, on the real default model (smollm2), in one process.

    python benchmarks/batch_priority.py --num-batch 64 --output-len 32 --interactive 8 --repeats 3
    python benchmarks/batch_priority.py --num-batch 16 --output-len 8 --no-ttft --http-concurrency 1,16

Three questions (issue 20's targets), each against a peer measured in the same run:
1. Throughput: the batch path (tokenmill.batch's runner through the server's handlers, results
   fsynced line by line, priority 100) against offline LLM.generate on the same prompts (the
   same Engine object: nothing differs but the path). rows/s, output tok/s, ratio (target >= 0.9).
2. (--http-concurrency) The same lines as one batch through the HTTP Batch API (upload, create,
   poll until completed, with the openai client) against the same requests sent one by one to
   /v1/completions at each given client concurrency; ratio against the best of them.
3. Interactive TTFT (unless --no-ttft): requests one every --interval seconds, alone, then while
   a batch runs at priority 100 (the batch yields), then while the same batch runs at priority 0
   (no priority: interactive waits behind it). p50 and p99 (target: p50 beside the priority-100
   batch within 1.5x of alone), and the batch's output tok/s while it runs beside them.
   --lower-priority-step-tokens 4,8,none repeats the priority-100 part at each scheduler cap
   (`none`: no cap), in the same run; --ttft-only skips questions 1 and 2. Each TTFT is also
   split by the engine's step log: what was left of the step in progress at arrival, the wait
   until its own first step, that step's time and tokens, and the time after it.
Medians over --repeats runs; JSON on stdout, with the CPU model and the load average at the
start and the end (a loaded machine makes every absolute figure meaningless; ratios less so).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import uvicorn

from tokenmill import LLM
from tokenmill.batch.format import BatchLine
from tokenmill.batch.results import ResultFiles
from tokenmill.batch.runner import run_lines
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.sampling import SamplingParams
from tokenmill.server.app import create_app
from tokenmill.server.batch_calls import BatchCalls
from tokenmill.server.served import ServedModels

MODEL = "smollm2"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(length)] for _ in range(n)]


def body(ids: list[int], output_len: int) -> dict:
    return {"model": MODEL, "prompt": ids, "max_tokens": output_len, "temperature": 0, "ignore_eos": True}


def offline(llm: LLM, batch: list[list[int]], output_len: int) -> float:
    t = time.perf_counter()
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    elapsed = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return elapsed


async def engine_alone(engine: AsyncEngine, batch: list[list[int]], output_len: int) -> float:
    """Every request submitted at once to AsyncEngine.generate: the engine's loop, no batch path."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def one(i, ids):
        async for _ in engine.generate(ids, params, f"alone-{time.monotonic_ns()}-{i}", priority=100):
            pass

    t = time.perf_counter()
    await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))
    return time.perf_counter() - t


async def batch_path(calls: BatchCalls, batch: list[list[int]], output_len: int, concurrency: int) -> float:
    lines = [BatchLine(i + 1, f"row-{i}", "/v1/completions", body(ids, output_len)) for i, ids in enumerate(batch)]
    with tempfile.TemporaryDirectory() as tmp, ResultFiles(Path(tmp) / "out.jsonl") as results:
        t = time.perf_counter()
        await run_lines(lines, [], calls, results, concurrency)
        elapsed = time.perf_counter() - t
        assert results.num_completed == len(lines), (results.num_completed, results.num_failed)
    return elapsed


class Server:
    """The real app (Batch API included) on a real port, over the benchmark's engine."""

    def __init__(self, engine: AsyncEngine, data_dir: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(create_app({MODEL: engine}, data_dir=Path(data_dir)), port=port,
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True


def batch_http(url: str, batch: list[list[int]], output_len: int) -> float:
    """Upload, create, poll: the whole round trip a client of the Batch API waits for."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    lines = [json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/completions",
                         "body": body(ids, output_len)}) for i, ids in enumerate(batch)]
    t = time.perf_counter()
    uploaded = client.files.create(file=("rows.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())),
                                   purpose="batch")
    job = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    while job.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.05)
        job = client.batches.retrieve(job.id)
    elapsed = time.perf_counter() - t
    assert job.status == "completed" and job.request_counts.completed == len(batch), job
    return elapsed


async def requests_http(url: str, batch: list[list[int]], output_len: int, concurrency: int) -> float:
    """The same requests to /v1/completions, at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        async def one(ids):
            async with gate:
                r = await http.post("/v1/completions", json=body(ids, output_len))
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == output_len, r.text

        t = time.perf_counter()
        await asyncio.gather(*(one(ids) for ids in batch))
        return time.perf_counter() - t


class StepLog:
    """Every engine step's start, end (time.monotonic, the engine's metrics clock) and tokens,
    to split a TTFT into where its time went: the step in progress when it arrived, its own
    first step (the one whose output processing stamped its first token), and after."""

    def __init__(self, engine):
        self.steps: list[tuple[float, float, int]] = []
        step = engine.step

        def timed():
            t0 = time.monotonic()
            out = step()
            self.steps.append((t0, time.monotonic(), engine.stats.last_step_tokens))
            return out

        engine.step = timed  # the engine thread calls it; the list is only read afterwards

    def split(self, sent: float, stamped: float, first: float) -> dict:
        own = next(s for s in self.steps if s[0] <= stamped <= s[1])
        busy = [s for s in self.steps if s[0] <= sent < s[1]]
        return {
            "in_progress_left_ms": 1000 * (busy[0][1] - sent) if busy else 0.0,
            "in_progress_tokens": busy[0][2] if busy else 0,
            "wait_ms": 1000 * (own[0] - sent),  # the step in progress, and any step it missed
            "own_step_ms": 1000 * (own[1] - own[0]),
            "own_step_tokens": own[2],
            "after_ms": 1000 * (first - own[1]),  # output processing, delivery to the client
        }


async def ttfts(engine: AsyncEngine, interactive: list[list[int]], interval: float) -> list[tuple]:
    """(sent, first token stamped by the engine, first token received) times (time.monotonic) of
    requests arriving one every `interval` seconds (priority 0)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def one(i, ids) -> tuple[float, float, float]:
        t, first, stamped = time.monotonic(), None, None
        async for o in engine.generate(ids, params, f"chat-{time.monotonic_ns()}-{i}"):
            if first is None and o.outputs[0].token_ids:
                first, stamped = time.monotonic(), o.metrics.first_token_time
        return t, stamped, first

    tasks = []
    for i, ids in enumerate(interactive):
        tasks.append(asyncio.create_task(one(i, ids)))
        await asyncio.sleep(interval)
    return list(await asyncio.gather(*tasks))


async def ttfts_beside_batch(engine, interactive, interval, batch, output_len, priority):
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)

    async def bg(i, ids):
        async for _ in engine.generate(ids, params, f"bg-{time.monotonic_ns()}-{i}", priority=priority):
            pass

    background = [asyncio.create_task(bg(i, ids)) for i, ids in enumerate(batch)]
    while engine.stats.num_running == 0:  # the batch holds the engine before the first arrival
        await asyncio.sleep(0.01)
    tokens0, t0 = engine.stats.generation_tokens_total, time.perf_counter()
    result = await ttfts(engine, interactive, interval)
    # What the batch got meanwhile: every generated token but the interactive requests' 8 each.
    batch_tok_s = (engine.stats.generation_tokens_total - tokens0 - 8 * len(interactive)) / (time.perf_counter() - t0)
    if all(t.done() for t in background):
        log("warning: the batch ended before the interactive requests did; raise --background-factor")
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    return result, batch_tok_s


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def throughput(seconds: list[float], rows: int, output_len: int) -> dict:
    s = statistics.median(seconds)
    return {"rows_per_s": rows / s, "output_tok_per_s": rows * output_len / s, "seconds_runs": seconds}


async def main_async(args, llm: LLM, engine: AsyncEngine) -> dict:
    models = ServedModels([MODEL])
    models.attach(MODEL, engine)
    calls = BatchCalls(models)
    batch = prompts(args.num_batch, args.input_len, 0)
    # Fresh interactive prompts for every measurement: a prompt seen in an earlier phase would
    # hit the prefix cache and prefill half its tokens, flattering whichever phase came later.
    seeds = iter(range(1000, 10**6))

    def interactive():
        return prompts(args.interactive, args.input_len, next(seeds))
    want_http = args.http_concurrency and args.throughput
    server = Server(engine, tempfile.mkdtemp(prefix="tokenmill-bench-")) if want_http else None
    runs: dict[str, list] = {}
    splits: dict[str, list[dict]] = {}
    steps = StepLog(engine.engine)

    def add(key, value):
        runs.setdefault(key, []).append(value)
        log(f"{key}: {value if isinstance(value, float) else [round(v, 3) for v in value]}")

    def add_ttfts(key, times):
        add(key, [first - sent for sent, _, first in times])
        split = [steps.split(*t) for t in times]
        splits.setdefault(key, []).extend(split)
        log(f"{key} split (ms, tokens): " + "; ".join(" ".join(f"{v:.0f}" for v in d.values()) for d in split))

    scheduler = engine.engine.scheduler
    default_cap = scheduler.lower_priority_step_tokens
    for r in range(args.repeats):
        log(f"repeat {r + 1}/{args.repeats}, load {os.getloadavg()[0]:.1f}")
        if args.throughput:
            # Offline first, both drive the one Engine: on the engine's own thread, between two of
            # its loop's steps, so the loop cannot step the engine at the same time (it did, from a
            # worker thread, when the previous phase's aborts kept the loop busy: a race that hung
            # a run here). Not on the main thread: on a loaded machine it ran the same steps
            # several times slower (273 s against 48 s in one run here).
            add("offline_s", await engine.call(lambda _: offline(llm, batch, args.output_len)))
            add("engine_alone_s", await engine_alone(engine, batch, args.output_len))
            add("batch_path_s", await batch_path(calls, batch, args.output_len, args.concurrency))
        if server is not None:
            add("batch_http_s", await asyncio.to_thread(batch_http, server.url, batch, args.output_len))
            for c in args.http_concurrency:
                add(f"requests_http_c{c}_s", await requests_http(server.url, batch, args.output_len, c))
        if args.ttft:
            add_ttfts("ttft_alone", await ttfts(engine, interactive(), args.interval))
            big = batch * args.background_factor
            for cap in [default_cap] + [c for c in args.lower_priority_step_tokens if c != default_cap]:
                # Set between runs, on the engine thread's own object: nothing runs in between.
                scheduler.lower_priority_step_tokens = cap
                key = "ttft_batch_prio100" + ("" if cap == default_cap else f"_cap{cap}")
                result, batch_tok_s = await ttfts_beside_batch(
                    engine, interactive(), args.interval, big, args.output_len, 100)
                add_ttfts(key, result)
                add(key + "_batch_tok_s", batch_tok_s)
            scheduler.lower_priority_step_tokens = default_cap
            result, batch_tok_s = await ttfts_beside_batch(
                engine, interactive(), args.interval, big, args.output_len, 0)
            add_ttfts("ttft_batch_prio0", result)
            add("ttft_batch_prio0_batch_tok_s", batch_tok_s)
    if server is not None:
        server.stop()

    n, k = args.num_batch, args.output_len
    report = {"lower_priority_step_tokens": default_cap}
    if args.throughput:
        report.update({"offline_llm_generate": throughput(runs["offline_s"], n, k),
                       "engine_alone": throughput(runs["engine_alone_s"], n, k),
                       "batch_path": throughput(runs["batch_path_s"], n, k)})
        path = statistics.median(runs["batch_path_s"])
        report["batch_path_vs_offline"] = statistics.median(runs["offline_s"]) / path
        report["batch_path_vs_engine_alone"] = statistics.median(runs["engine_alone_s"]) / path
    if server is not None:
        report["batch_http"] = throughput(runs["batch_http_s"], n, k)
        per_c = {c: throughput(runs[f"requests_http_c{c}_s"], n, k) for c in args.http_concurrency}
        report["requests_http"] = {f"concurrency_{c}": v for c, v in per_c.items()}
        best = max(per_c, key=lambda c: per_c[c]["rows_per_s"])
        report["batch_http_vs_best_requests_http"] = report["batch_http"]["rows_per_s"] / per_c[best]["rows_per_s"]
        report["best_requests_http_concurrency"] = best
    if args.ttft:
        beside = [key for key in runs if key.startswith("ttft_batch") and not key.endswith("_batch_tok_s")]
        for key in ["ttft_alone"] + beside:
            report[key] = {"p50_ms": 1000 * statistics.median(pct(x, 0.5) for x in runs[key]),
                           "p99_ms": 1000 * statistics.median(pct(x, 0.99) for x in runs[key]),
                           # Where the time went: medians over every request of every repeat.
                           "split_median": {part: statistics.median(d[part] for d in splits[key])
                                            for part in splits[key][0]}}
        alone = report["ttft_alone"]["p50_ms"]
        for key in beside:
            report[key]["p50_vs_alone"] = report[key]["p50_ms"] / alone
            report[key]["batch_output_tok_s"] = statistics.median(runs[key + "_batch_tok_s"])
        report["ttft_p50_ratio_prio100_vs_alone"] = report["ttft_batch_prio100"]["p50_ms"] / alone
        report["ttft_p50_ratio_prio0_vs_alone"] = report["ttft_batch_prio0"]["p50_ms"] / alone
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-batch", type=int, default=64, help="batch lines (rows)")
    ap.add_argument("--input-len", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--output-len", type=int, default=32, help="output tokens per row (ignore_eos)")
    ap.add_argument("--interactive", type=int, default=8, help="interactive requests per TTFT measurement")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between interactive arrivals")
    ap.add_argument("--background-factor", type=int, default=2,
                    help="the batch beside interactive traffic is this many copies of the rows")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=64, help="batch lines in flight (the runner's bound)")
    ap.add_argument("--http-concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="also time the HTTP Batch API against one-by-one requests at these client "
                         "concurrencies, e.g. 1,32")
    ap.add_argument("--no-ttft", dest="ttft", action="store_false", help="skip the interactive TTFT part")
    ap.add_argument("--ttft-only", dest="throughput", action="store_false",
                    help="skip the throughput parts (questions 1 and 2)")
    ap.add_argument("--lower-priority-step-tokens", default=[],
                    type=lambda s: [None if x == "none" else int(x) for x in s.split(",") if x],
                    help="measure TTFT beside the priority-100 batch at each of these scheduler caps, "
                         "e.g. 4,8,none (default: the engine's setting only)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    facts = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_start": os.getloadavg(), "args": vars(args)}
    t = time.perf_counter()
    llm = LLM(MODEL, max_num_seqs=args.max_num_seqs)
    log(f"model loaded in {time.perf_counter() - t:.0f} s")
    # Warm-up at the measured batch's shapes: the first steps of a new shape cost many times more.
    llm.generate(prompts(args.num_batch, args.input_len, 2), SamplingParams(max_tokens=4, ignore_eos=True))
    engine = AsyncEngine(llm.engine)  # the same Engine: offline and batch differ only in path
    engine.start()
    try:
        report = asyncio.run(main_async(args, llm, engine))
    finally:
        engine.shutdown()
    print(json.dumps({**facts, "load_end": os.getloadavg(), **report}, indent=2))


if __name__ == "__main__":
    main()
