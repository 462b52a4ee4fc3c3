#!/usr/bin/env python3
"""The same multi-turn workload through three fronts over the same replicas: tokenmill router
(`prefix`), tokenmill router (`round-robin`) and SGLang's router (`--policy cache_aware`, if its
Python package `sglang_router` is importable by --sglang-python). Fronts run one at a time; the
replicas' prefix caches are reset before each, and the fleet hit rate is read from the
replicas' own counters (vllm:prefix_cache_hits / _queries), not from any router.

Before the first front every replica serves a few requests of its own (then its cache is
reset): a fresh replica's first requests are slow (allocator, first kernels), and without this
the front that ran first always measured worst. `--repeats N` runs the fronts N times, in an
order rotated each time so every front runs in every position, and prints per-front medians.

    python benchmarks/router_compare.py --replicas 3 --num-prompts 96 --max-concurrency 6 \\
        --sglang-python /tmp/sglvenv/bin/python --repeats 3 --out /tmp/router-compare
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
_COUNTER = re.compile(r"^vllm:prefix_cache_(hits|queries)_total\{[^}]*\}\s+(\S+)", re.MULTILINE)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy within {timeout}s")


def _hits(replicas: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in replicas:
        for kind, value in _COUNTER.findall(httpx.get(url + "/metrics", timeout=5).text):
            if kind == "hits":
                hits += float(value)
            else:
                queries += float(value)
    return hits, queries


def _bench(base_url: str, args: argparse.Namespace, result: Path, extra: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "tokenmill", "bench", "--base-url", base_url, "--model", "smollm2",
                    "--backend", "chat", "--dataset-name", "synthetic", "--synthetic-max-output-len",
                    str(args.max_output_len), "--ignore-eos", "--percentiles", "50,99", "--no-progress",
                    "--result-json", str(result), *extra],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)


def _warm(replicas: list[str], args: argparse.Namespace) -> None:
    """A few conversations straight to each replica (another seed than the measured workload),
    so no front meets a cold replica; their cache entries go with the reset before each front."""
    for i, url in enumerate(replicas):
        _bench(url, args, args.out / f"warm{i}.json",
               ["--num-prompts", "12", "--max-concurrency", "2", "--num-warmups", "0", "--seed", str(1000 + i)])


def _front_cmd(front: str, port: int, replicas: list[str], args: argparse.Namespace) -> list[str]:
    if front.startswith("sglang"):
        return [args.sglang_python, "-m", "sglang_router.launch_router", "--port", str(port),
                "--policy", "cache_aware", "--worker-urls", *replicas]
    return [sys.executable, "-m", "tokenmill", "router", "--port", str(port), "--policy", front,
            "--log-level", "warning", *[a for u in replicas for a in ("--replica", u)], *args.router_arg]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--max-concurrency", type=int, default=6)
    p.add_argument("--max-output-len", type=int, default=32)
    p.add_argument("--sglang-python", default=None, help="a python with sglang_router installed")
    p.add_argument("--fronts", default="prefix,round-robin,sglang-cache-aware")
    p.add_argument("--out", type=Path, default=Path("/tmp/router-compare"))
    p.add_argument("--repeats", type=int, default=1, help="runs of every front, in rotated orders")
    p.add_argument("--router-arg", action="append", default=[],
                   help="extra argument for the tokenmill router fronts (repeatable, e.g. --router-arg=--log-level=debug)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base_port = 18200
    replicas = [f"http://127.0.0.1:{base_port + 1 + i}" for i in range(args.replicas)]
    procs = [_spawn([sys.executable, "-m", "tokenmill", "serve", "--port", str(base_port + 1 + i), "--num-threads",
                     str(args.threads_per_replica), "--kv-cache-memory", args.kv_cache_memory, "--log-level",
                     "warning"], args.out / f"replica{i}.log") for i in range(args.replicas)]
    rows = []
    try:
        for url, proc in zip(replicas, procs):
            _wait(url + "/health", proc, 600)
        _warm(replicas, args)
        fronts = [f for f in args.fronts.split(",") if args.sglang_python or not f.startswith("sglang")]
        port = base_port
        health = f"http://127.0.0.1:{port}/health"
        for rep in range(args.repeats):
            for front in fronts[rep % len(fronts):] + fronts[:rep % len(fronts)]:
                for url in replicas:
                    httpx.post(url + "/reset_prefix_cache", timeout=30)
                router = _spawn(_front_cmd(front, port, replicas, args), args.out / f"front-{front}-{rep}.log")
                try:
                    _wait(health, router, 120)
                    time.sleep(2)  # a couple of health ticks: tokenizer fetched, load scraped
                    h0, q0 = _hits(replicas)
                    result = args.out / f"{front}-{rep}.json"
                    _bench(f"http://127.0.0.1:{port}", args, result,
                           ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
                            "--num-warmups", "3"])
                    h1, q1 = _hits(replicas)
                    if not front.startswith("sglang"):  # its decisions and predicted-vs-actual cached tokens
                        (args.out / f"front-{front}-{rep}.metrics").write_text(
                            httpx.get(health.replace("/health", "/metrics")).text)
                finally:
                    router.terminate()
                    router.wait(30)
                r = json.loads(result.read_text())
                rows.append({"front": front, "repeat": rep, "hit_rate": (h1 - h0) / max(1.0, q1 - q0),
                             "ttft_p50_ms": r["median_ttft_ms"], "ttft_p99_ms": r["p99_ttft_ms"],
                             "output_tok_s": r["output_throughput"], "failed": r["failed"],
                             # a front that ran while something else loaded the box shows here
                             "duration_s": round(r["duration"], 1), "load_1min_after": os.getloadavg()[0]})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("| front | runs | fleet prefix hit rate | TTFT p50 ms | TTFT p99 ms | output tok/s | failed |")
    print("|---|---|---|---|---|---|---|")
    for front in dict.fromkeys(row["front"] for row in rows):
        runs = [row for row in rows if row["front"] == front]
        med = {k: statistics.median(row[k] for row in runs) for k in ("hit_rate", "ttft_p50_ms", "ttft_p99_ms",
                                                                     "output_tok_s")}
        print(f"| {front} | {len(runs)} | {med['hit_rate']:.1%} | {med['ttft_p50_ms']:.0f} | {med['ttft_p99_ms']:.0f} "
              f"| {med['output_tok_s']:.1f} | {sum(row['failed'] for row in runs)} |")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
