#!/usr/bin/env python3
"""The same multi-turn workload through three fronts over the same replicas: tokenmill router
(`prefix`), tokenmill router (`round-robin`) and SGLang's router (`--policy cache_aware`, if its
Python package `sglang_router` is importable by --sglang-python). Fronts run one at a time; the
replicas' prefix caches are reset before each, and the fleet hit rate is read from the
replicas' own counters (vllm:prefix_cache_hits / _queries), not from any router.

    python benchmarks/router_compare.py --replicas 3 --num-prompts 96 --max-concurrency 6 \\
        --sglang-python /tmp/sglvenv/bin/python --out /tmp/router-compare
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
        for front in args.fronts.split(","):
            if front.startswith("sglang") and not args.sglang_python:
                continue
            port = base_port
            if front.startswith("sglang"):
                cmd = [args.sglang_python, "-m", "sglang_router.launch_router", "--port", str(port),
                       "--policy", "cache_aware", "--worker-urls", *replicas]
                health = f"http://127.0.0.1:{port}/health"
            else:
                cmd = [sys.executable, "-m", "tokenmill", "router", "--port", str(port), "--policy", front,
                       "--log-level", "warning", *[a for u in replicas for a in ("--replica", u)], *args.router_arg]
                health = f"http://127.0.0.1:{port}/health"
            for url in replicas:
                httpx.post(url + "/reset_prefix_cache", timeout=30)
            router = _spawn(cmd, args.out / f"front-{front}.log")
            try:
                _wait(health, router, 120)
                time.sleep(2)  # a couple of health ticks: tokenizer fetched, load scraped
                h0, q0 = _hits(replicas)
                result = args.out / f"{front}.json"
                subprocess.run([sys.executable, "-m", "tokenmill", "bench", "--base-url", f"http://127.0.0.1:{port}",
                                "--model", "smollm2", "--backend", "chat", "--dataset-name", "synthetic",
                                "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
                                "--synthetic-max-output-len", str(args.max_output_len), "--ignore-eos",
                                "--percentiles", "50,99", "--num-warmups", "3", "--no-progress", "--result-json", str(result)],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
                h1, q1 = _hits(replicas)
                if not front.startswith("sglang"):  # its decisions and predicted-vs-actual cached tokens
                    (args.out / f"front-{front}.metrics").write_text(httpx.get(health.replace("/health", "/metrics")).text)
            finally:
                router.terminate()
                router.wait(30)
            r = json.loads(result.read_text())
            rows.append({"front": front, "hit_rate": (h1 - h0) / max(1.0, q1 - q0),
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
    print("| front | fleet prefix hit rate | TTFT p50 ms | TTFT p99 ms | output tok/s | failed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['front']} | {row['hit_rate']:.1%} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} "
              f"| {row['output_tok_s']:.1f} | {row['failed']} |")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
