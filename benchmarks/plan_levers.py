"""Seed question (b): a $500K/month fleet cut towards $300K, lever by lever, simulated.

The fleet: Llama-3.1-70B in bf16 on H100 x4 (tensor parallel), no prefix caching, on-demand;
sized so it costs $500K/month at the load it carries within the SLO. The workload: chat
requests with a 1,500-token shared system prompt, 500 +-50% tokens of user text, 300 +-50%
output tokens, Poisson arrivals; SLO: p99 TTFT <= 500 ms and p99 TPOT <= 50 ms. Each lever
is a replica configuration searched for its SLO-bound rate per replica (tokenmill.plan.search);
its fleet is the replicas the same total load needs.

    python3 benchmarks/plan_levers.py
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.plan.catalog import hardware, model_shape  # noqa: E402
from tokenmill.plan.cost import default_profile  # noqa: E402
from tokenmill.plan.replica import ReplicaSpec  # noqa: E402
from tokenmill.plan.search import HOURS_PER_MONTH, max_rate  # noqa: E402
from tokenmill.plan.workload import synthetic  # noqa: E402

BUDGET = 500_000
SLOS = {"ttft": 500.0, "tpot": 50.0}
MODEL = model_shape("llama-3.1-70b")

LEVERS = [  # name, hardware, tp, format, prefix caching, quality risk
    ("baseline: H100x4 bf16, no prefix cache", "H100", 4, "bf16", False, "-"),
    ("prefix caching on", "H100", 4, "bf16", True, "none: exact reuse of the same KV"),
    ("+ FP8 weights (same GPUs)", "H100", 4, "fp8", True, "small: FP8 weight-only/W8A8 typically <1 pt on benchmarks; measure on your evals"),
    ("+ FP8, TP2 (half the GPUs per replica)", "H100", 2, "fp8", True, "as FP8; fewer KV blocks per replica"),
    ("+ right-sized GPU: H200x2 FP8", "H200", 2, "fp8", True, "as FP8"),
    ("+ right-sized GPU: MI300X x1 FP8", "MI300X", 1, "fp8", True, "as FP8; a second software stack to qualify"),
]


def spec(hw: str, tp: int, fmt: str, cache: bool) -> ReplicaSpec:
    config = EngineConfig.from_flat(max_num_seqs=128, max_num_batched_tokens=8192, enable_prefix_caching=cache,
                                    max_waiting_requests=10**9)
    return ReplicaSpec(MODEL, hardware(hw), tp, default_profile(hw, fmt), config)


def trace_at(rate: float):
    return synthetic(150, rate, input_len=500, output_len=300, range_ratio=0.5, prefix_len=1500, seed=3)


def main() -> None:
    rows = []
    total = None
    t0 = time.perf_counter()
    for name, hw, tp, fmt, cache, risk in LEVERS:
        s = spec(hw, tp, fmt, cache)
        cap = max_rate(s, trace_at, SLOS, start=2.0, iterations=5)
        if total is None:  # the baseline fleet costs the budget: that fixes the load it carries
            replicas = math.floor(BUDGET / (s.price_per_hour() * HOURS_PER_MONTH))
            total = replicas * cap.max_rate
        replicas = math.ceil(total / cap.max_rate) if cap.max_rate else None
        monthly = replicas * s.price_per_hour() * HOURS_PER_MONTH if replicas else None
        rows.append({"lever": name, "rate_per_replica": cap.max_rate, "replicas": replicas, "gpus": replicas and replicas * tp,
                     "monthly": monthly, "risk": risk, "kv_blocks": s.num_blocks,
                     "ttft_p99_ms": cap.metrics and cap.metrics.ttft.percentiles[99.0],
                     "tpot_p99_ms": cap.metrics and cap.metrics.tpot.percentiles[99.0]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"total load {total:.1f} req/s; search took {time.perf_counter() - t0:.0f} s")
    Path("/tmp/plan_levers.json").write_text(json.dumps({"total_rate": total, "rows": rows}, indent=1))
    print("| lever | req/s per replica | replicas (GPUs) | $/month | saving vs baseline | quality risk |")
    print("|---|---|---|---|---|---|")
    base = rows[0]["monthly"]
    for r in rows:
        print(f"| {r['lever']} | {r['rate_per_replica']:.2f} | {r['replicas']} ({r['gpus']}) | ${r['monthly']:,.0f} | "
              f"{(1 - r['monthly'] / base) * 100:.0f}% | {r['risk']} |")


if __name__ == "__main__":
    main()
