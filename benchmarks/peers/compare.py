#!/usr/bin/env python3
"""Run one `tokenmill bench` workload against tokenmill, llama.cpp's llama-server and (optionally)
the transformers floor peer, one server at a time on the same machine, and print the figures
side by side with tokenmill's ratios to each peer.

Servers run one after another, never together: on a small CPU box they would fight for cores.
Each gets the same prompts (same seed), the same warm-ups and ignore_eos, so every request
generates exactly --output-len tokens.

    python benchmarks/peers/compare.py --concurrency 1,16 --num-prompts 32 \\
        --input-len 200 --output-len 128 --out /tmp/peers

The llama-server binary is built (and cached in ~/.cache/tokenmill/llama.cpp) on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS = ("tokenmill", "llama.cpp", "transformers")


@dataclass(frozen=True)
class Row:
    peer: str
    concurrency: int
    result: dict

    def get(self, key: str) -> float:
        return float(self.result.get(key) or 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(peer: str, port: int, args: argparse.Namespace) -> list[str]:
    threads = str(args.threads)
    if peer == "tokenmill":
        return [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--log-level", "warning",
                "--num-threads", threads, *shlex.split(args.tokenmill_args)]
    if peer == "llama.cpp":
        return [str(HERE / "serve_llama_server.sh"), str(port), str(args.llama_np), str(args.llama_ctx), threads]
    return [sys.executable, str(HERE / "transformers_server.py"), "--port", str(port), "--threads", threads]


class Server:
    def __init__(self, peer: str, args: argparse.Namespace, log_dir: Path):
        self.peer = peer
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"{peer}.server.log", "w")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # A new session, so stopping it also stops the shell wrapper's child (llama-server).
        self.proc = subprocess.Popen(server_command(peer, self.port, args), cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_healthy(args.startup_timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.peer} not healthy after {timeout:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def bench_command(url: str, concurrency: int, out_json: Path, args: argparse.Namespace, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "tokenmill.bench", "--base-url", url, "--backend", args.backend,
        "--dataset-name", "random", "--num-prompts", str(args.num_prompts),
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--max-concurrency", str(concurrency), "--num-warmups", str(args.num_warmups), "--ignore-eos",
        "--seed", str(seed), "--result-json", str(out_json), "--no-progress",
    ]


def run_peer(peer: str, args: argparse.Namespace, out: Path) -> list[Row]:
    rows = []
    server = Server(peer, args, out)
    try:
        for i, c in enumerate(args.concurrency):
            path = out / f"{peer}-c{c}.json"
            # Fresh prompts per concurrency (seed + i): repeated ones would hit the prefix caches.
            cmd = bench_command(server.url, c, path, args, args.seed + i)
            print(f"$ {shlex.join(cmd)}", flush=True)
            subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                           stdout=subprocess.DEVNULL if args.quiet else None, timeout=args.bench_timeout)
            rows.append(Row(peer, c, json.loads(path.read_text())))
    finally:
        server.stop()
    return rows


COLUMNS = (
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.1f}"),
    ("TPOT p99 ms", "p99_tpot_ms", "{:.1f}"),
    ("failed", "failed", "{:.0f}"),
)


def _ratio(tm: Row, peer: Row, key: str) -> str:
    return f"{tm.get(key) / peer.get(key):.2f}x" if peer.get(key) else "n/a"


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    head = "| server | concurrency | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        lines.append(f"| {r.peer} | {r.concurrency} | " + " | ".join(f.format(r.get(k)) for _, k, f in COLUMNS) + " |")
    ratios = []
    for c in args.concurrency:
        tm = next((r for r in rows if r.peer == "tokenmill" and r.concurrency == c), None)
        for peer in rows:
            if tm is None or peer.peer == "tokenmill" or peer.concurrency != c:
                continue
            cells = [_ratio(tm, peer, k) for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms")]
            ratios.append(f"| {peer.peer} | {c} | " + " | ".join(cells) + " |")
    if ratios:
        lines += ["", "tokenmill / peer (throughput: higher is better; TTFT and TPOT: lower is better)", "",
                  "| peer | concurrency | output tok/s | TTFT p50 | TPOT p50 |", "|---|---|---|---|---|", *ratios]
    return "\n".join(lines) + "\n"


def plot_cdfs(rows: list[Row], out: Path) -> list[Path]:
    from tokenmill.bench.plots import plot_latency_cdfs
    from tokenmill.bench.report import records_from_result

    paths = []
    for c in sorted({r.concurrency for r in rows}):
        series = {r.peer: records_from_result(r.result) for r in rows if r.concurrency == c}
        paths.append(plot_latency_cdfs(series, out / f"latency_cdf_c{c}.png", f"concurrency {c}"))
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="tokenmill,llama.cpp", help=f"comma-separated from {PEERS}")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--backend", choices=("completions", "chat"), default="completions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads for every server")
    p.add_argument("--llama-np", type=int, default=16, help="llama-server parallel slots")
    p.add_argument("--llama-ctx", type=int, default=8192, help="llama-server total context (KV) tokens")
    p.add_argument("--tokenmill-args", default="", help="extra `tokenmill serve` flags, one quoted string")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--bench-timeout", type=float, default=1800.0)
    p.add_argument("--out", default="benchmark-results/peers", help="JSON results, server logs, compare.md")
    p.add_argument("--plot", action="store_true", help="latency CDFs of all peers, one PNG per concurrency")
    p.add_argument("--quiet", action="store_true", help="hide the per-run bench tables")
    args = p.parse_args()
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    if unknown := set(peers) - set(PEERS):
        p.error(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for peer in peers:
        rows += run_peer(peer, args, out)
    table = markdown(rows, args)
    (out / "compare.md").write_text(table)
    if args.plot:
        for path in plot_cdfs(rows, out):
            print(f"plot: {path}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
