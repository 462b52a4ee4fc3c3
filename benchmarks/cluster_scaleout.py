#!/usr/bin/env python3
"""The same workload on the same CPUs through three set-ups: one `tokenmill serve` replica with
all the threads, two replicas behind `tokenmill router --local 2`, and two replicas on Ray Serve
(tokenmill/cluster/ray_serve.py, a local Ray cluster). Each set-up is started once and measured
`--runs` times with `tokenmill bench`; medians, and ratios against the single replica of the
same invocation. The load average is printed beside each run: on a shared machine, compare the
ratios, not the absolute numbers.

    python benchmarks/cluster_scaleout.py --threads 2 --runs 3 --num-prompts 32 --max-concurrency 8 \\
        --out /tmp/scaleout
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy within {timeout}s")


def _bench(url: str, args, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "tokenmill", "bench", "--base-url", url, "--model", "smollm2",
                    "--dataset-name", "random", "--random-input-len", str(args.input_len),
                    "--random-output-len", str(args.output_len), "--ignore-eos", "--num-prompts", str(args.num_prompts),
                    "--max-concurrency", str(args.max_concurrency), "--num-warmups", "2", "--no-progress",
                    "--percentiles", "50,99", "--result-json", str(out)],
                   cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"output_tok_s": r["output_throughput"], "ttft_p50_ms": r["median_ttft_ms"],
            "failed": r["failed"], "load": os.getloadavg()[0]}


def _measure(name: str, url: str, args) -> list[dict]:
    runs = []
    for i in range(args.runs):
        row = {"setup": name, "run": i, **_bench(url, args, args.out / f"{name}-{i}.json")}
        print(json.dumps(row), flush=True)
        runs.append(row)
    return runs


def run_process(name: str, cmd: list[str], url: str, args) -> list[dict]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=(args.out / f"{name}.log").open("w"),
                            stderr=subprocess.STDOUT)
    try:
        _wait(url, 300, proc)
        time.sleep(2)  # the router's first health/metrics ticks
        return _measure(name, url, args)
    finally:
        proc.terminate()
        proc.wait(60)


def run_ray(args) -> list[dict]:
    import ray
    from ray import serve

    from tokenmill.cluster.ray_serve import build_app

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="tm-ray-bench-"), runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        port = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        per = args.threads // 2
        serve.run(build_app({"engine": {"model": "smollm2", "num_threads": per}, "num_replicas": 2, "num_cpus": per,
                             "router": {"policy": "prefix"}, "graceful_shutdown_timeout_s": 2}),
                  name="bench", route_prefix="/")
        return _measure("ray-2", f"http://127.0.0.1:{port}", args)
    finally:
        serve.shutdown()
        ray.shutdown()


def print_summary(rows: list[dict], setups: list[str]) -> None:
    """Medians per set-up, and each against the single replica measured in the same invocation."""
    ones = [r["output_tok_s"] for r in rows if r["setup"] == "one"]
    base = statistics.median(ones) if ones else None
    print("\nsetup      output tok/s (median)  TTFT p50 ms  vs one  failed  load (1-min)")
    for setup in setups:
        mine = [r for r in rows if r["setup"] == setup]
        tok = statistics.median(r["output_tok_s"] for r in mine)
        ttft = statistics.median(r["ttft_p50_ms"] for r in mine)
        ratio = f"{tok / base:.2f}x" if base else "-"
        loads = ", ".join(f"{r['load']:.1f}" for r in mine)
        print(f"{setup:10} {tok:21.1f}  {ttft:11.0f}  {ratio:>6}  {sum(r['failed'] for r in mine):6}  {loads}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2, help="CPU threads for each set-up in total")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--setups", default="one,router-2,ray-2")
    p.add_argument("--out", type=Path, default=Path("/tmp/scaleout"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tm = [sys.executable, "-m", "tokenmill"]
    rows: list[dict] = []
    for setup in args.setups.split(","):
        port = _port()
        url = f"http://127.0.0.1:{port}"
        if setup == "one":
            rows += run_process(setup, [*tm, "serve", "--port", str(port), "--num-threads", str(args.threads)], url, args)
        elif setup == "router-2":
            rows += run_process(setup, [*tm, "router", "--port", str(port), "--local", "2",
                                        "--local-threads", str(args.threads)], url, args)
        elif setup == "ray-2":
            rows += run_ray(args)
    print_summary(rows, args.setups.split(","))
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
