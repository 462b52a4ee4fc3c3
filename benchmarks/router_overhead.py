#!/usr/bin/env python3
"""What the router adds: TTFT through `tokenmill router` vs straight to a replica, requests per
second through it, and routing decisions per second in-process (tokenize + hash + index match +
policy), against fast fake replicas so that only the router's own cost shows.

The fakes answer at once (8 streamed tokens, usage with cached_tokens) and serve the default
model's real tokenizer, so the router tokenizes and hashes every prompt as it does in front of
`tokenmill serve`.

    python benchmarks/router_overhead.py --requests 300 --seconds 10 --concurrency 32

`--baseline DIR` measures a second checkout's router (e.g. `git worktree add DIR <commit>`)
the same way in the same run, alternating with this one over `--rounds`, for before/after
figures taken under the same load; medians over the rounds are printed with the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request  # at module level: the route annotations are resolved from here
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = " ".join(["You are a careful assistant who answers in short, exact sentences."] * 12)


def fake_replica(port: int) -> None:
    from tokenmill.bench.tokenizer import load_tokenizer

    doc = {"tokenizer_json": load_tokenizer().backend.to_str(), "bos_token_id": None, "eos_token_ids": [],
           "chat_template": CHATML, "add_bos_token": False, "fingerprint": "fake-b16"}
    usage = {"prompt_tokens": 200, "completion_tokens": 8, "total_tokens": 208,
             "prompt_tokens_details": {"cached_tokens": 0}}
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse('vllm:num_requests_waiting{model_name="m"} 0\n'
                                 'vllm:num_requests_running{model_name="m"} 0\n'
                                 'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n')

    @app.get("/v1/tokenmill/info")
    async def info():
        return {"models": [{"id": "m", "block_size": 16, "max_model_len": 8192, "fingerprint": "fake-b16"}]}

    @app.get("/v1/tokenmill/tokenizer")
    async def tokenizer(model: str):
        return JSONResponse(doc)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if not body.get("stream"):
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok " * 8}}], "usage": usage}

        async def events():
            for _ in range(8):
                yield 'data: {"choices": [{"index": 0, "delta": {"content": "ok "}}]}\n\n'
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _body(i: int, stream: bool) -> dict:
    return {"model": "m", "stream": stream, "messages": [{"role": "system", "content": SYSTEM},
                                                         {"role": "user", "content": f"Question number {i}?"}]}


def _ttft_once(client: httpx.Client, url: str, i: int) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=_body(i, True)) as r:
        chunks = r.iter_raw()
        next(chunks)
        ttft = (time.perf_counter() - t0) * 1000
        for _ in chunks:
            pass
    return ttft


def ttft_ms(url: str, n: int) -> list[float]:
    with httpx.Client(timeout=30) as client:
        out = [_ttft_once(client, url, i) for i in range(n)]
    return out[n // 10:]  # the first tenth warms connections up


def ttft_pairs_ms(direct_url: str, routed_url: str, n: int) -> tuple[list[float], list[float]]:
    """Straight and through the router, one after the other, request by request: on a shared
    machine both then see the same load, and the difference of the medians is the router's."""
    direct, routed = [], []
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        for i in range(n):
            direct.append(_ttft_once(a, direct_url, i))
            routed.append(_ttft_once(b, routed_url, i))
    return direct[n // 10:], routed[n // 10:]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(url: str, seconds: float, concurrency: int, count: bool = False) -> float | tuple[float, int]:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(k: int):
            nonlocal done
            i = k
            while time.perf_counter() < stop:
                r = await client.post(url + "/v1/chat/completions", json=_body(i, False))
                r.raise_for_status()
                done += 1
                i += concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        rate = done / (time.perf_counter() - t0)
        return (rate, done) if count else rate


def decisions_per_s(seconds: float) -> float:
    """The decision alone, in this process: tokenize, hash, match 3 indexes, choose, insert."""
    from tokenmill.bench.tokenizer import load_tokenizer
    from tokenmill.model.tokenizer import Tokenizer
    from tokenmill.router.policy import Policy, ReplicaView
    from tokenmill.router.prefix_index import PrefixIndex, block_hashes, usable_blocks
    from tokenmill.router.prompts import SegmentEncoder, prompt_ids

    tok = Tokenizer(load_tokenizer().backend, chat_template=CHATML)
    encoder = SegmentEncoder(tok)
    indexes = [PrefixIndex(16384) for _ in range(3)]
    policy, rng = Policy(), random.Random(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ids = prompt_ids(tok, "/v1/chat/completions", _body(n, False), encoder)
        k = usable_blocks(len(ids), 16)
        hashes = block_hashes(ids[:k * 16], 16)
        views = [ReplicaView(f"r{j}", scraped_at=0.0, in_flight=j, hit_blocks=ix.match(hashes))
                 for j, ix in enumerate(indexes)]
        d = policy.choose(views, 0.0, rng, k)
        indexes[int(d.replica[1:])].insert(hashes)
        n += 1
    return n / (time.perf_counter() - t0)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reps = httpx.get(url + "/admin/replicas", timeout=1).json()
            if all(r["healthy"] and r["tokenizer"] for r in reps):
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the router and its fakes did not come up")
        time.sleep(0.5)


def measure_router(repo: Path, replica_urls: list[str], args: argparse.Namespace) -> dict:
    """One router (the code under `repo`) in front of the fakes: every figure, beside a direct one."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    url = "http://127.0.0.1:18300"
    router = subprocess.Popen([sys.executable, "-m", "tokenmill", "router", "--port", "18300", "--log-level", "warning",
                               *[a for u in replica_urls for a in ("--replica", u)]], env=env, cwd=repo)
    try:
        wait_ready(url, router)
        ttft_ms(url, 30)  # warm: the router's connections to the replicas, its caches
        cpu0 = cpu_seconds(router.pid)
        direct, routed = ttft_pairs_ms(replica_urls[0], url, args.requests)
        cpu_per_stream = (cpu_seconds(router.pid) - cpu0) / args.requests
        direct_rps = asyncio.run(throughput(replica_urls[0], args.seconds, args.concurrency))
        cpu0 = cpu_seconds(router.pid)
        rps, sent = asyncio.run(throughput(url, args.seconds, args.concurrency, count=True))
        cpu_per_request = (cpu_seconds(router.pid) - cpu0) / sent
    finally:
        router.terminate()
        router.wait(30)
    d50, r50 = statistics.median(direct), statistics.median(routed)
    return {"ttft_p50_direct_ms": round(d50, 3), "ttft_p50_routed_ms": round(r50, 3),
            "added_ttft_p50_ms": round(r50 - d50, 3),
            # the median of each pair's difference: less moved by load that comes and goes
            "added_ttft_p50_paired_ms": round(statistics.median(r - d for r, d in zip(routed, direct)), 3), "direct_req_per_s_one_replica": round(direct_rps, 1),
            "routed_req_per_s": round(rps, 1),
            # CPU time the router process spent per request (all its threads): unlike the
            # wall-clock figures above, barely moved by other work on a shared machine.
            "router_cpu_ms_per_stream": round(cpu_per_stream * 1000, 3),
            "router_cpu_ms_per_request_c32": round(cpu_per_request * 1000, 3)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fake-replica", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="rounds; with --baseline the routers alternate")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout whose router is measured the same way in the same run (before/after)")
    args = p.parse_args()
    if args.fake_replica:
        fake_replica(args.fake_replica)
        return 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ports = [18301, 18302, 18303]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    fakes = [subprocess.Popen([sys.executable, __file__, "--fake-replica", str(port)], env=env) for port in ports]
    routers = {"now": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs: dict[str, list[dict]] = {name: [] for name in routers}
    try:
        for _ in range(args.rounds):
            for name, repo in routers.items():
                runs[name].append(measure_router(repo, urls, args))
    finally:
        for proc in fakes:
            proc.terminate()
        for proc in fakes:
            proc.wait(30)
    out = {name: {"median": {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}, "rounds": rs}
           for name, rs in runs.items()}
    if args.baseline:
        now, base = out["now"]["median"], out["baseline"]["median"]
        out["now_vs_baseline"] = {k: round(now[k] / base[k], 3) for k in now if base[k]}
    out["decisions_per_s"] = round(decisions_per_s(min(args.seconds, 5.0)), 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
