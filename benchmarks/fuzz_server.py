"""The long fuzz run: hostile and schema-generated bodies against a real `tokenmill serve`.

    python benchmarks/fuzz_server.py --bodies 10000 --concurrency 8

Starts `tokenmill serve` on the default model (or --model, context --max-model-len), then sends --bodies requests,
half drawn by schemathesis from the server's own /openapi.json (bodies that keep the schema and
bodies that break one rule of it), half from tests/server/fuzz_bodies.py (what a schema cannot
say: odd unicode, 200 kB strings, deep nesting, truncated JSON, wrong content types, huge
n/logprobs/stop/logit_bias, pathological regexes and schemas). Valid bodies run with
max_tokens <= 4. Counts: bodies, answers by status, 5xx, hangs (no answer within --timeout),
error bodies outside OpenAI's shape, transport failures; then whether the server is still
whole: /health 200, running/waiting/KV-usage gauges at zero, a normal request answered.
Exits 1 if any of those fail.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.server.fuzz_bodies: the strategies the test suite uses too

import schemathesis  # noqa: E402
from schemathesis.core import NOT_SET  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.server.fuzz_bodies import CHAT, COMPLETIONS, FuzzRequest, cheap, fuzz_requests, problem  # noqa: E402

MODEL = "smollm2"


def start_server(port: int, model: str, max_model_len: int, num_threads: int, log) -> subprocess.Popen:
    """`tokenmill serve` with its log in a file (a pipe nobody reads would fill and stall it)."""
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--model", model,
           "--served-model-name", MODEL, "--log-level", "warning", "--max-model-len", str(max_model_len),
           "--num-threads", str(num_threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("serve did not become healthy")


def schema_requests(url: str) -> st.SearchStrategy[FuzzRequest]:
    """Bodies schemathesis draws from the served schema, both modes, made cheap to run."""
    schema = schemathesis.openapi.from_dict(httpx.get(url + "/openapi.json", timeout=10).json())
    ops = []
    for path in (COMPLETIONS, CHAT):
        op = schema[path]["POST"]
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            ops.append(op.as_strategy(generation_mode=mode).map(lambda case, path=path: _as_request(path, case)))
    return st.one_of(ops)


def _as_request(path: str, case) -> FuzzRequest:
    body = case.body
    if body is NOT_SET:
        data = b""
    elif isinstance(body, (bytes, bytearray)):  # a negative case may carry raw bytes
        data = bytes(body)
    else:
        data = json.dumps(cheap(body)).encode()
    return FuzzRequest(path, data, case.media_type or "application/json")


def generate(strategy: st.SearchStrategy[FuzzRequest], count: int, out: queue.Queue) -> None:
    """Draw `count` requests into `out` (bounded: bodies go out as they are made)."""
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(req: FuzzRequest) -> None:
        out.put(req)

    try:
        draw()
    finally:
        out.put(None)


def describe(req: FuzzRequest) -> str:
    """What makes a body costly, in a line: its route, size and the fields that set the work."""
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        return f"{req.path} {len(req.body)} bytes, not JSON"
    except RecursionError:  # the deep-nesting bodies: the server answers them, Python's json cannot
        return f"{req.path} {len(req.body)} bytes, JSON nested too deep to parse"
    if not isinstance(body, dict):
        return f"{req.path} {len(req.body)} bytes, a JSON {type(body).__name__}"
    keys = ("n", "best_of", "max_tokens", "max_completion_tokens", "min_tokens", "logprobs", "top_logprobs", "stream")
    fields = {k: body[k] for k in keys if k in body}
    shaped = "regex/grammar/schema" if any(k in body for k in ("guided_regex", "guided_grammar", "guided_json",
                                                                "response_format")) else ""
    return f"{req.path} {len(req.body)} bytes {fields} {shaped}".rstrip()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        gauges = {name: metric(text, name) for name in
                  ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")}
        if not any(gauges.values()) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bodies", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer that count as a hang")
    ap.add_argument("--model", default="smollm2")
    # A valid 30 kB prompt is a legitimate 8k-token prefill, seconds of CPU that only slow the
    # run; a short context refuses it (after tokenizing it) like any prompt over the context.
    ap.add_argument("--max-model-len", type=int, default=1024)
    # The generator (hypothesis, schemathesis) keeps a core busy. A server whose two compute
    # threads share their cores with it waits at every parallel region for the thread that
    # was put aside (a scheduler slice, ~10 ms, a few hundred times a step): answers then take
    # tens of seconds for reasons that are the benchmark's, not the server's. One thread each.
    ap.add_argument("--num-threads", type=int, default=1, help="the server's compute threads")
    ap.add_argument("--url", default=None, help="fuzz a running server instead of starting one")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop sending after this long (counts stay true)")
    args = ap.parse_args()

    proc = None
    url = args.url
    if url is None:
        from tests.server.conftest import free_port

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        log = tempfile.NamedTemporaryFile("w", prefix="fuzz_server_", suffix=".log", delete=False)
        proc = start_server(port, args.model, args.max_model_len, args.num_threads, log)
        print(f"server up in {time.monotonic() - t0:.0f} s at {url}")
    try:
        strategy = st.one_of(fuzz_requests(MODEL), schema_requests(url))
        todo: queue.Queue = queue.Queue(maxsize=4 * args.concurrency)
        threading.Thread(target=generate, args=(strategy, args.bodies, todo), daemon=True).start()
        counts: Counter = Counter()
        statuses: Counter = Counter()
        examples: dict[str, str] = {}
        lock = threading.Lock()
        latencies: list[float] = []
        slowest: list[tuple[float, object, str]] = []  # the ten slowest answers, to attribute them

        def send(req: FuzzRequest, client: httpx.Client) -> None:
            headers = {} if req.content_type is None else {"Content-Type": req.content_type}
            started = time.monotonic()
            try:
                r = client.post(url + req.path, content=req.body, headers=headers)
                bad = problem(r.status_code, r.headers.get("content-type", ""), r.text)
                kind = None if bad is None else ("5xx" if r.status_code >= 500 else "bad_shape")
                status = r.status_code
            except httpx.TimeoutException:
                kind, bad, status = "hang", "no answer within the timeout", "timeout"
            except httpx.TransportError as e:
                kind, bad, status = "transport", repr(e), "transport"
            seconds = time.monotonic() - started
            with lock:
                latencies.append(seconds)
                slowest.append((seconds, status, describe(req)))
                slowest.sort(key=lambda x: -x[0])
                del slowest[10:]
                counts["bodies"] += 1
                statuses[status] += 1
                if kind is not None:
                    counts[kind] += 1
                    examples.setdefault(kind, f"{bad} <- {req!r}")
                if counts["bodies"] % 500 == 0:
                    print(f"  {counts['bodies']} bodies at {time.monotonic() - t0:.0f} s, {dict(statuses)}",
                          flush=True)

        t0 = time.monotonic()
        stop_at = None if args.max_seconds is None else t0 + args.max_seconds

        def worker() -> None:
            with httpx.Client(timeout=args.timeout) as client:
                while (req := todo.get()) is not None:
                    if stop_at is not None and time.monotonic() > stop_at:
                        break
                    send(req, client)
                try:  # let the other workers see the end too (when full, they stop at the clock)
                    todo.put_nowait(None)
                except queue.Full:
                    pass

        with ThreadPoolExecutor(args.concurrency) as pool:
            for f in [pool.submit(worker) for _ in range(args.concurrency)]:
                f.result()
        elapsed = time.monotonic() - t0

        health = httpx.get(url + "/health", timeout=10).status_code
        gauges = wait_idle(url)
        normal = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        whole = health == 200 and not any(gauges.values()) and normal.status_code == 200
        print(f"\nbodies: {counts['bodies']} in {elapsed:.0f} s (concurrency {args.concurrency})")
        print("answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
        print(f"5xx: {counts['5xx']}  hangs: {counts['hang']}  bad error shapes: {counts['bad_shape']}  "
              f"transport failures: {counts['transport']}")
        if latencies:
            q = statistics.quantiles(latencies, n=100)
            print(f"answer time: p50 {q[49]:.2f} s, p99 {q[98]:.2f} s, max {max(latencies):.1f} s, "
                  f"over 60 s: {sum(t > 60 for t in latencies)}")
            for seconds, status, what in slowest:
                print(f"  slow: {seconds:.1f} s -> {status}: {what}")
        print(f"after: /health {health}, gauges {gauges}, normal request {normal.status_code}")
        if proc is not None:
            tracebacks = Path(log.name).read_text(errors="replace").count("Traceback")
            print(f"server log: {log.name} ({tracebacks} tracebacks)")
        for kind, example in examples.items():
            print(f"first {kind}: {example[:600]}")
        failed = counts["5xx"] or counts["hang"] or counts["bad_shape"] or counts["transport"] or not whole
        return 1 if failed else 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
