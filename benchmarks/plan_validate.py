"""Predicted vs measured: `tokenmill plan` against the real `tokenmill serve` on this machine.

Starts `tokenmill serve` (smollm2, --num-threads 1 like the calibration, default scheduling
settings), runs `tokenmill bench` over held-apart workloads (different rates, concurrencies,
lengths, one shared-prefix; none of them is the calibration grid), then simulates each one
with the calibrated profile: open-loop runs replay the bench's own send times and lengths
from its result JSON, concurrency-limited runs re-run the closed loop with the same lengths.
Prints a markdown table of measured / predicted / error for output throughput, TTFT and TPOT
(p50 and p99) and writes everything to --out.

    python3 benchmarks/plan_validate.py --profile tokenmill/plan/profiles/cpu-2core-q4_1.json

With --calibrate, the same server also runs a calibration grid (closed loops of other
concurrencies and lengths than any validation workload, two of them with a shared prefix,
lone-client loops and Poisson runs of other lengths and rates), its runs spread evenly through
the validation runs so a drift of the machine hits both alike;
`tokenmill plan calibrate --step-log` fits the profile on the steps the server logged during
the calibration runs only (and, with `--bench-result`, the front's latency on those runs'
client results) and writes it to --profile; then each validation run is simulated
with it. Every step is in steps.jsonl, so a miss can be traced to the steps that made it.
Output throughput is taken over the simulator's window (first send to last end; see
window_throughput). With --repeats N every workload (and the grid) runs N times, in rotated
orders, and the table compares medians: this VM's speed moves by about 20% within seconds
(docs/benchmarks.md, runs E-H), more than one run can average out.

    python3 benchmarks/plan_validate.py --calibrate --repeats 3 --profile /tmp/profile.json --out /tmp/val
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.router_compare import _wait as wait_healthy  # noqa: E402
from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.plan.catalog import hardware, model_shape  # noqa: E402
from tokenmill.plan.cost import Profile  # noqa: E402
from tokenmill.plan.replica import ReplicaSpec  # noqa: E402
from tokenmill.plan.workload import TraceRequest, from_bench_result  # noqa: E402

# name: bench flags 
WORKLOADS = {  # a quiet 2-core machine: a step takes ~0.05-3 s, each run ~15-60 s
    "rate0.5-in128-out16": "--num-prompts 20 --request-rate 0.5 --random-input-len 128 --random-output-len 16",
    "rate1-in64-out32": "--num-prompts 24 --request-rate 1 --random-input-len 64 --random-output-len 32",
    "conc1-in128-out32": "--num-prompts 8 --max-concurrency 1 --random-input-len 128 --random-output-len 32",
    "conc4-in192-out16": "--num-prompts 12 --max-concurrency 4 --random-input-len 192 --random-output-len 16",
    "conc8-in32-out24": "--num-prompts 24 --max-concurrency 8 --random-input-len 32 --random-output-len 24",
    "prefix192-rate1-in32-out16": "--num-prompts 24 --request-rate 1 --random-prefix-len 192 --random-input-len 32 --random-output-len 16",
}


# Closed loops: concurrency x prompt length, 12 output tokens, 2 x concurrency prompts each;
# then two loops whose prompts share a prefix (other lengths than the prefix workload's): a
# prompt chunk that attends to a cached context is a step shape the loops above never make,
# and the prefix workload's TTFT was under-predicted by 17-33% in all three runs without it.
CALIBRATION = {f"calibration-c{c}-in{n}": f"--num-prompts {2 * c} --max-concurrency {c} --random-input-len {n} --random-output-len 12"
               for c in (2, 6, 12) for n in (24, 160, 320)}
CALIBRATION |= {f"calibration-c{c}-in{n}-prefix{p}": f"--num-prompts {2 * c} --max-concurrency {c} --random-input-len {n} "
                f"--random-output-len 12 --random-prefix-len {p}" for c, n, p in ((2, 32, 160), (6, 48, 288))}
# Then the shapes only a lone client or Poisson arrivals make (other lengths and rates than the
# validation's). A decode step of one row: the loops above make it only in a loop's tail, with
# the next request being admitted beside it, and there it took 63 ms against 45 ms in the
# conc1 workload (run E of docs/benchmarks.md, whose fit put a lone row at 61 ms: conc1 TPOT
# +25%). A prompt chunk joining running decodes: the closed loops start their requests in
# waves, so such mixed steps were rare in their log and came out 15-26% short in run E.
CALIBRATION |= {
    "calibration-c1-in48": "--num-prompts 3 --max-concurrency 1 --random-input-len 48 --random-output-len 24",
    "calibration-c1-in256": "--num-prompts 2 --max-concurrency 1 --random-input-len 256 --random-output-len 24",
    "calibration-rate0.7-in96": "--num-prompts 12 --request-rate 0.7 --random-input-len 96 --random-output-len 24",
    "calibration-rate2-in24": "--num-prompts 16 --request-rate 2 --random-input-len 24 --random-output-len 12",
}


def start_server(port: int, threads: int, log, step_log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--num-threads", str(threads),
           "--log-level", "warning", "--step-log", str(step_log)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, 600)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def bench(port: int, flags: str, seed: int, result: Path) -> None:
    cmd = [sys.executable, "-m", "tokenmill", "bench", "--base-url", f"http://127.0.0.1:{port}", "--ignore-eos",
           "--no-progress", "--seed", str(seed), "--result-json", str(result), *flags.split()]
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, stdout=subprocess.DEVNULL)


def fit_profile(args, out: Path, calib_lines: list[str], calib_results: list[Path]) -> None:
    """Fit on the calibration runs' logged steps, and the front's latency on their clients'
    results lined up with those steps."""
    calib_log = out / "calibration-steps.jsonl"
    calib_log.write_text("".join(calib_lines))
    subprocess.run([sys.executable, "-m", "tokenmill", "plan", "calibrate", "--num-threads", str(args.threads),
                    "--step-log", str(calib_log), "--bench-result", *map(str, calib_results),
                    "--output", args.profile], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   stdout=subprocess.DEVNULL)
    p = json.loads(Path(args.profile).read_text())
    fit = p["fit"]
    print(f"calibrated on {fit['samples']} logged steps: median |error| {fit['median_abs_rel_error']:.1%}, "
          f"p90 {fit['p90_abs_rel_error']:.1%}; front: in {p['ingress_s'] * 1e3:.1f} ms, out {p['egress_s'] * 1e3:.1f} ms "
          f"({fit['front_requests']} requests)", flush=True)


def window_throughput(result: dict) -> float:
    """Output tokens per second from the first request's send to the last one's end: the
    simulator's window. The bench's own figure divides by its whole run, which also counts the
    wait before the first Poisson arrival (up to seconds at 0.5 request/s), a wait the result
    file does not keep, so no replay could predict it."""
    end = max(s + e for s, e, n in zip(result["start_times"], result["e2els"], result["output_lens"]) if n > 0)
    return result["total_output_tokens"] / (end - min(result["start_times"]))


def flag(flags: str, name: str, default=None):
    parts = flags.split()
    return parts[parts.index(name) + 1] if name in parts else default


def simulate(spec: ReplicaSpec, flags: str, result_path: Path):
    prefix = int(flag(flags, "--random-prefix-len", 0))
    conc = flag(flags, "--max-concurrency")
    trace = from_bench_result(result_path, prefix)
    if conc:  # a closed loop: every request is ready at 0 and waits for one of `conc` slots
        # (replaying the first burst's measured send times instead was tried on runs A, B and C
        # of docs/benchmarks.md: it fixed C's conc4 and made A's and B's worse)
        trace = [TraceRequest(0.0, t.input_len, t.output_len, t.prefix_len) for t in trace]
    return spec.simulator(max_concurrency=int(conc) if conc else None).run(trace).metrics


def err(pred: float, meas: float) -> float:
    return (pred - meas) / meas * 100 if meas else float("nan")


def spread(first: list, second: list) -> list:
    """first with second's items spread evenly through it (second[j] after about (j + 1/2) / len(second)
    of first), so a drift of the machine meets both lists alike."""
    at = [int((j + 0.5) * len(first) / len(second)) for j in range(len(second))]
    out = []
    for i, item in enumerate(first):
        out += [second[j] for j, k in enumerate(at) if k == i] + [item]
    return out + [second[j] for j, k in enumerate(at) if k >= len(first)]


def run_list(args) -> list[tuple[str, str, str, bool]]:
    """(result name, workload, bench flags, calibration?) of every run, in the order they run:
    per repeat the validation workloads (rotated by one per repeat) and, with --calibrate, the
    calibration grid, spread through each other."""
    val = [(name, flags) for name, flags in WORKLOADS.items() if not args.only or name in args.only]
    runs = []
    for r in range(args.repeats):
        tag = f"-r{r}" if r else ""  # repeat 0 keeps the plain names of single-repeat runs
        rot = val[r % len(val):] + val[:r % len(val)]
        mine = [(name + tag, name, flags, False) for name, flags in rot]
        if args.calibrate:
            grid = [(name + tag, name, flags, True) for name, flags in CALIBRATION.items()]
            mine = spread(grid, mine)
        runs += mine
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--port", type=int, default=8431)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/plan_validate")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every workload (and the calibration grid) this many times; the table compares medians")
    ap.add_argument("--resimulate", action="store_true",
                    help="run nothing: simulate the runs already in --out again with --profile")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit the profile first, on this server's logged steps over the calibration grid; write it to --profile")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_list(args)
    if args.resimulate:
        loads = out / "loads.json"
        if not loads.exists():  # a run from before --repeats: its table has the loads
            loads.write_text(json.dumps({r["workload"]: (r["load_1m"], r["load_1m_after"])
                                         for r in json.loads((out / "validation.json").read_text())}))
        report(args, out, runs, json.loads(loads.read_text()))
        return
    step_log = out / "steps.jsonl"
    step_log.unlink(missing_ok=True)
    with open(out / "serve.log", "w") as log:
        server = start_server(args.port, args.threads, log, step_log)
        try:
            # One throw-away run warms the server (first-request costs); the measured runs send
            # no warm-up of their own, which would put the shared prefix in the cache before the
            # first measured request of the prefix workload.
            bench(args.port, "--num-prompts 2 --max-concurrency 1 --random-input-len 16 --random-output-len 4", 99,
                  out / "warmup.json")
            calib_lines: list[str] = []
            loads = {}
            for seed, (name, _, flags, calibration) in enumerate(runs):
                # Each run starts from an empty prefix cache and draws its own prompts: with one
                # seed, two workloads of equal input length would send the same prompts, and the
                # second would be served from the first one's cache (the simulation, which starts
                # empty, would not know).
                httpx.post(f"http://127.0.0.1:{args.port}/reset_prefix_cache", timeout=30, trust_env=False).raise_for_status()
                before, load = step_log.stat().st_size, os.getloadavg()[0]  # the log's lines are whole (line-buffered)
                bench(args.port, flags, seed, out / f"{name}.json")
                loads[name] = (load, os.getloadavg()[0])
                if calibration:
                    with step_log.open() as f:  # only what this run added
                        f.seek(before)
                        calib_lines += f.readlines()
                print(f"{name}: done (load {load:.1f})", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    (out / "loads.json").write_text(json.dumps(loads))
    if args.calibrate:
        fit_profile(args, out, calib_lines, [out / f"{name}.json" for name, _, _, calibration in runs if calibration])
    report(args, out, runs, loads)


FIGURES = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "p99_ttft_ms", "p99_tpot_ms")


def report(args, out: Path, runs: list, loads: dict) -> None:
    """Simulate each validation run with --profile; per workload, the median over its repeats of
    each measured figure against the median of the predicted ones, and the measured figures'
    range over the repeats (how far the machine itself moved between repeats)."""
    profile = Profile.load(args.profile)
    spec = ReplicaSpec(model_shape("smollm2-135m"), hardware(profile.device), 1, profile,
                       EngineConfig.from_flat(max_waiting_requests=10**9), 8192)
    per: dict[str, list[dict]] = {}
    for name, workload, flags, calibration in runs:
        if calibration:
            continue
        path = out / f"{name}.json"
        meas = json.loads(path.read_text())
        meas["output_throughput"] = window_throughput(meas)
        pred = simulate(spec, flags, path)
        pred_figs = (pred.output_throughput, pred.ttft.median, pred.tpot.median, pred.ttft.percentiles[99.0],
                     pred.tpot.percentiles[99.0])
        run = {"run": name, "load_1m": loads[name][0], "load_1m_after": loads[name][1]}
        run |= {key: {"measured": meas[key], "predicted": p} for key, p in zip(FIGURES, pred_figs)}
        per.setdefault(workload, []).append(run)
        print(json.dumps(run), flush=True)
    rows = []
    for workload, reps in per.items():
        row = {"workload": workload, "repeats": reps}
        for key in FIGURES:
            m = statistics.median(r[key]["measured"] for r in reps)
            p = statistics.median(r[key]["predicted"] for r in reps)
            lo, hi = min(r[key]["measured"] for r in reps), max(r[key]["measured"] for r in reps)
            row[key] = {"measured": m, "predicted": p, "error_pct": err(p, m), "measured_range": [lo, hi]}
        rows.append(row)
    (out / "validation.json").write_text(json.dumps(rows, indent=1))
    n = max(len(r["repeats"]) for r in rows)
    print(f"medians over {n} repeat(s); [measured min-max over the repeats]" if n > 1 else "")
    print("| workload | out tok/s meas / pred (err) | TTFT p50 ms | TPOT p50 ms | TTFT p99 ms | TPOT p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for k in FIGURES:
            c = f"{r[k]['measured']:.1f} / {r[k]['predicted']:.1f} ({r[k]['error_pct']:+.0f}%)"
            if n > 1:
                c += " [{:.0f}-{:.0f}]".format(*r[k]["measured_range"])
            cells.append(c)
        print(f"| {r['workload']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
