"""HTTP cost on the real model: the same workload offline (LLM.generate) and through
`tokenmill serve` + `tokenmill bench` at the same concurrency, in one run.

    python benchmarks/server_vs_offline.py --concurrency 16 --num-prompts 32

Workload: random 200-token prompts, 128 output tokens, ignore_eos; the engine config is the
serve defaults with max_num_seqs = concurrency, so both sides batch the same way.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from tokenmill import LLM, SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(args) -> float:
    llm = LLM("smollm2", dtype=args.dtype, max_num_seqs=args.concurrency)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
    return args.num_prompts * args.output_len / (time.perf_counter() - t)


def over_http(args) -> float:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--dtype", args.dtype,
         "--max-num-seqs", str(args.concurrency), "--log-level", "warning"],
    )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out = tempfile.mktemp(suffix=".json")
        subprocess.run(
            [sys.executable, "-m", "tokenmill", "bench", "--base-url", f"http://127.0.0.1:{port}",
             "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
             "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
             "--ignore-eos", "--max-concurrency", str(args.concurrency), "--num-warmups", "1",
             "--result-json", out],
            check=True, stdout=subprocess.DEVNULL,
        )
        with open(out) as f:
            return json.load(f)["output_throughput"]
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    off = offline(args)
    print(f"offline   {off:.1f} output tok/s", flush=True)
    http = over_http(args)
    print(f"HTTP      {http:.1f} output tok/s (tokenmill bench, concurrency {args.concurrency})")
    print(f"HTTP / offline = {100 * http / off:.1f}%")


if __name__ == "__main__":
    main()
