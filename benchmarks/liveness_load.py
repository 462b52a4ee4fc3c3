"""Liveness under load: /health and /metrics latency while many streams are open.

    python benchmarks/liveness_load.py --streams 1000 --max-tokens 4          # starts `tokenmill serve`
    python benchmarks/liveness_load.py --base-url http://127.0.0.1:8000 --streams 1000 --endpoint chat

Opens N streaming completions at once (each a distinct prompt, so none is a pure prefix-cache
hit; --endpoint chat sends chat messages, which also renders a template per request on the
server's event loop) and, from a separate process so the load generator's own work does not
delay it, probes /health and /metrics every --probe-interval seconds until every stream has
ended. Reports: streams finished / failed / refused with 429, whether any 429 came after a
token (it must not: a stream's status is sent before its first token), the p50/p99/max probe
latencies, and after the run the gauges (all zero once idle). A Kubernetes liveness probe
that times out (1 s by default) restarts the pod, hence the 1 s bar on the p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@dataclass
class StreamResult:
    status: int = 0
    tokens: int = 0  # content chunks received
    finished: bool = False  # a finish_reason and [DONE] arrived
    error: str = ""


@dataclass
class Report:
    streams: int
    max_tokens: int
    finished: int = 0
    failed: int = 0
    refused_429: int = 0
    errors_after_first_token: int = 0
    seconds: float = 0.0
    probes: dict = field(default_factory=dict)  # path -> {n, p50, p99, max, failed}
    gauges_after: dict = field(default_factory=dict)


async def one_stream(client: httpx.AsyncClient, i: int, args) -> StreamResult:
    body = {"model": args.model, "max_tokens": args.max_tokens, "stream": True, "temperature": 0}
    if args.endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"Question {i}: name a city and one fact about it."}]
    else:
        path = "/v1/completions"
        body["prompt"] = f"Fact {i}:"
    res = StreamResult()
    try:
        async with client.stream("POST", path, json=body) as r:
            res.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = event["error"]["message"]
                    continue
                for choice in event["choices"]:
                    if choice.get("text") or choice.get("delta", {}).get("content"):
                        res.tokens += 1
                    if choice.get("finish_reason"):
                        res.finished = True
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def probe(base_url: str, headers: dict, interval: float, stop, out) -> None:
    """Runs in its own process: time GET /health and /metrics until told to stop."""
    latencies: dict[str, list[tuple[float, float]]] = {"/health": [], "/metrics": []}  # (since start, latency)
    failed = {"/health": 0, "/metrics": 0}
    start = time.perf_counter()
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            for path in latencies:
                t0 = time.perf_counter()
                try:
                    ok = client.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies[path].append((t0 - start, time.perf_counter() - t0))
                failed[path] += not ok
            time.sleep(interval)
    out.put((latencies, failed))


def summarize(samples: list[tuple[float, float]], failed: int) -> dict:
    ordered = sorted(latency for _, latency in samples)
    if not ordered:
        return {"n": 0, "failed": failed}
    worst_at = max(samples, key=lambda s: s[1])[0]
    return {"n": len(ordered), "failed": failed, "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max": ordered[-1],
            "over_1s": sum(latency > 1.0 for latency in ordered), "max_at_s": worst_at}


def gauges(base_url: str, headers: dict) -> dict:
    text = httpx.get(base_url + "/metrics", headers=headers, timeout=30).text
    values = {}
    for line in text.splitlines():
        for name in GAUGES:
            if line.startswith(name + "{"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


async def load(args, headers: dict) -> Report:
    report = Report(streams=args.streams, max_tokens=args.max_tokens)
    stop, out = mp.Event(), mp.Queue()
    prober = mp.Process(target=probe, args=(args.base_url, headers, args.probe_interval, stop, out), daemon=True)
    prober.start()
    limits = httpx.Limits(max_connections=args.streams + 10, max_keepalive_connections=args.streams + 10)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout,
                                 limits=limits) as client:
        results = await asyncio.gather(*(one_stream(client, i, args) for i in range(args.streams)))
    report.seconds = time.monotonic() - t0
    stop.set()
    latencies, failed = out.get(timeout=60)
    prober.join(10)
    for r in results:
        if r.status == 429:
            report.refused_429 += 1
        elif r.status == 200 and r.finished and not r.error:
            report.finished += 1
        else:
            report.failed += 1
            report.errors_after_first_token += bool(r.tokens and r.error)
    report.probes = {path: summarize(latencies[path], failed[path]) for path in latencies}
    await asyncio.sleep(1.0)  # idle now: the gauges must read zero
    report.gauges_after = gauges(args.base_url, headers)
    return report


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = args.port
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--log-level", "warning",
           *args.serve_args]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tokenmill serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="an already running server (default: start one)")
    p.add_argument("--port", type=int, default=8321, help="port of the server this script starts")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="flags for tokenmill serve (last)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--api-key", default=None)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--probe-interval", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    proc = None
    if args.base_url is None:
        proc, args.base_url = start_server(args)
    try:
        report = asyncio.run(load(args, headers))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (report.failed == 0 and report.errors_after_first_token == 0
          and all(v["p99"] < 1.0 and v["failed"] == 0 for v in report.probes.values())
          and not any(report.gauges_after.values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
