"""Two checkouts of tokenmill served one after the other on this machine, the same `tokenmill
bench` workloads against each, alternating A, B, A, B... so a drift of the machine hits both.

    git worktree add /tmp/tm-before <rev>
    python3 benchmarks/serve_ab.py --a /tmp/tm-before --b . --repeats 3 --num-threads 1

Prints, per workload, the median over the repeats of output tok/s, TTFT p50 and TPOT p50 for
each side and B/A. Each side's server runs from its own directory (PYTHONPATH), with its own
kernels (the kernel cache is keyed by the source).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.router_compare import _wait as wait_healthy  # noqa: E402

WORKLOADS = {
    "conc1-in128-out32": "--num-prompts 8 --max-concurrency 1 --random-input-len 128 --random-output-len 32",
    "conc8-in32-out24": "--num-prompts 24 --max-concurrency 8 --random-input-len 32 --random-output-len 24",
    "rate1-in64-out32": "--num-prompts 16 --request-rate 1 --random-input-len 64 --random-output-len 32",
}
METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms")


def run_side(checkout: Path, port: int, threads: int, out: Path, tag: str) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with open(out / f"serve-{tag}.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--num-threads",
                                   str(threads), "--log-level", "warning"], cwd=checkout, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", server, 600)
            results = {}
            for seed, (name, flags) in enumerate(WORKLOADS.items()):
                path = out / f"{tag}-{name}.json"
                # The bench client is this checkout's (the same on both sides), only the server differs.
                subprocess.run([sys.executable, "-m", "tokenmill", "bench", "--base-url", f"http://127.0.0.1:{port}",
                                "--ignore-eos", "--no-progress", "--num-warmups", "1", "--seed", str(seed),
                                "--result-json", str(path), *flags.split()],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, stdout=subprocess.DEVNULL)
                results[name] = {k: json.loads(path.read_text())[k] for k in METRICS}
            return results
        finally:
            server.terminate()
            server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="checkout A (before)")
    ap.add_argument("--b", required=True, help="checkout B (after)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=8441)
    ap.add_argument("--out", default="/tmp/serve_ab")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for r in range(args.repeats):
        for tag, checkout in (("A", args.a), ("B", args.b)):
            load = os.getloadavg()[0]
            runs[tag].append(run_side(Path(checkout).resolve(), args.port, args.num_threads, out, f"{tag}{r}"))
            print(f"repeat {r} side {tag}: load {load:.1f}-{os.getloadavg()[0]:.1f} {json.dumps(runs[tag][-1])}", flush=True)
    print("| workload | metric | A (median) | B (median) | B/A |")
    print("|---|---|---|---|---|")
    for name in WORKLOADS:
        for k in METRICS:
            a = statistics.median(run[name][k] for run in runs["A"])
            b = statistics.median(run[name][k] for run in runs["B"])
            print(f"| {name} | {k} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    (out / "ab.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
