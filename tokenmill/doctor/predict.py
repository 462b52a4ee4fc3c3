"""What a suggested change would buy, from `tokenmill plan simulate` on the measured workload:
the window's concurrency and request lengths replayed as a closed loop against the replica's
settings as they are and as the finding would change them.

The planner runs as its own command (a subprocess): the doctor stays outside the engine and its
scheduler (layer contract `doctor-over-http`), and the prediction is exactly what an operator
gets by running the printed command.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenmill.doctor.evidence import ModelWindow
from tokenmill.doctor.rules import Finding


@dataclass(frozen=True)
class PlanTarget:
    """What the planner should model: a catalog model and hardware (see `tokenmill plan`)."""

    model: str
    hardware: str


def workload_args(w: ModelWindow) -> list[str] | None:
    """The window as a closed loop: as many clients as requests were in the system on average
    (Little's law), each with the window's mean prompt and output length."""
    done = w.deltas.get("vllm:request_success", 0.0)
    if done < 1 or w.mean_load < 0.5:
        return None
    prompt = max(1, round(w.deltas.get("vllm:prompt_tokens", 0.0) / done))
    output = max(1, round(w.deltas.get("vllm:generation_tokens", 0.0) / done))
    clients = max(1, math.ceil(w.mean_load))
    return ["--max-concurrency", str(clients), "--num-prompts", str(max(4 * clients, 40)),
            "--random-input-len", str(prompt), "--random-output-len", str(output)]


def settings_args(limits: dict) -> list[str]:
    args = []
    for key, flag in (("max_num_seqs", "--max-num-seqs"), ("max_num_batched_tokens", "--max-num-batched-tokens"),
                      ("num_kv_blocks", "--num-kv-blocks")):
        if limits.get(key):
            args += [flag, str(limits[key])]
    if limits.get("enable_prefix_caching") is False:
        args.append("--no-prefix-cache")
    return args


def changed(f: Finding, limits: dict) -> dict | None:
    """The replica's limits as the finding would change them, where the planner models the change."""
    if f.rule == "batch_cap_too_low" and f.fix.startswith("--max-num-seqs "):
        return {**limits, "max_num_seqs": int(f.fix.split()[1])}
    if f.rule == "prefix_cache_off":
        return {**limits, "enable_prefix_caching": True}
    if f.rule == "kv_pool_too_small" and limits.get("num_kv_blocks"):
        return {**limits, "num_kv_blocks": 2 * limits["num_kv_blocks"]}  # "more KV memory": say, twice
    if f.rule == "prefill_interference" and limits.get("max_num_batched_tokens"):
        return {**limits, "max_num_batched_tokens": max(64, limits["max_num_batched_tokens"] // 2)}
    return None


def simulate(target: PlanTarget, limits: dict, workload: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "tokenmill", "plan", "simulate", "--model", target.model, "--hardware",
               target.hardware, *settings_args(limits), *workload, "--result-json", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"tokenmill plan simulate failed: {run.stderr[-500:]}")
        result = json.loads(out.read_text())
    return {"ttft_p50_ms": round(result["median_ttft_ms"], 1), "tpot_p50_ms": round(result["median_tpot_ms"], 1),
            "output_tok_s": round(result["output_throughput"], 1)}


def predict(findings: list[Finding], windows: list[ModelWindow], target: PlanTarget) -> None:
    """Add `predicted` (before and after) to each finding the planner can model."""
    by_where = {f"{w.replica} ({w.model})": w for w in windows}
    for f in findings:
        w = by_where.get(f.where)
        if w is None or not w.limits:
            continue
        after = changed(f, w.limits)
        workload = workload_args(w)
        if after is None or workload is None:
            continue
        before_m, after_m = simulate(target, w.limits, workload), simulate(target, after, workload)
        f.evidence["predicted"] = {"by": f"tokenmill plan simulate --model {target.model} --hardware {target.hardware}",
                                   "before": before_m, "after": after_m}
