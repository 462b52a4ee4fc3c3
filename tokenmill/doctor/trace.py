"""A torch profiler trace (Chrome format, from `tokenmill serve --profile-dir` and POST
/start_profile, /stop_profile) reduced to what the rules need: within the engine's step ranges
("tokenmill.step"), how much of the time operators ran on the CPU and kernels on the GPU, and
which operators took the most."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

STEP_RANGE = "tokenmill.step"  # as tokenmill.model.profiling names it (the doctor imports no model code)


@dataclass
class TraceSummary:
    steps: int = 0
    step_us: float = 0.0  # total time inside step ranges
    cpu_op_us: float = 0.0  # of which covered by at least one CPU operator
    gpu_kernel_us: float | None = None  # of which a GPU kernel ran (None: no GPU in the trace)
    top_ops: list[tuple[str, float]] = field(default_factory=list)  # (name, us) of top-level operators

    @property
    def cpu_op_share(self) -> float:
        return self.cpu_op_us / self.step_us if self.step_us else 0.0

    @property
    def gpu_busy_share(self) -> float | None:
        return None if self.gpu_kernel_us is None or not self.step_us else self.gpu_kernel_us / self.step_us


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _covered(spans: list[tuple[float, float]], within: list[tuple[float, float]]) -> float:
    """Time of `spans` (already merged) inside `within` (merged)."""
    total, i = 0.0, 0
    for start, end in within:
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < end:
            total += max(0.0, min(end, spans[j][1]) - max(start, spans[j][0]))
            j += 1
    return total


def summarize(trace: dict, top: int = 8) -> TraceSummary:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == STEP_RANGE])
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    op_spans = _union([(e["ts"], e["ts"] + e["dur"]) for e in ops])
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    # Top-level operators: those not inside another operator of the same thread.
    by_thread: dict[object, list[dict]] = {}
    for e in ops:
        by_thread.setdefault(e.get("tid"), []).append(e)
    totals: Counter = Counter()
    for thread_ops in by_thread.values():
        end = -1.0
        for e in sorted(thread_ops, key=lambda e: (e["ts"], -e["dur"])):
            if e["ts"] >= end:
                totals[e["name"]] += e["dur"]
                end = e["ts"] + e["dur"]
    summary = TraceSummary(
        steps=len(steps), step_us=sum(b - a for a, b in steps), cpu_op_us=_covered(op_spans, steps),
        top_ops=totals.most_common(top))
    if kernels:  # GPU timestamps are on the trace's clock; kernels running past a step's end are not counted
        summary.gpu_kernel_us = _covered(_union([(e["ts"], e["ts"] + e["dur"]) for e in kernels]), steps)
    return summary


def read_trace(path: str) -> TraceSummary:
    with open(path) as f:
        return summarize(json.load(f))
