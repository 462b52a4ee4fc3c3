"""Results out: the result-JSON dict (vLLM's field names) and the rich summary table."""

from __future__ import annotations

import math
import time
from datetime import datetime

from rich.console import Console
from rich.table import Table

from tokenmill.bench.metrics import LATENCY_METRICS, BenchmarkMetrics, percentile_key
from tokenmill.bench.records import RequestRecord
from tokenmill.bench.runner import RunResult

METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


def _rate(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def result_dict(run: RunResult, metrics: BenchmarkMetrics, meta: dict) -> dict:
    """One run as `vllm bench serve --save-result` writes it: configuration, totals, per-request
    arrays (input_lens, output_lens, ttfts, itls, generated_texts, errors) and, per latency
    metric, mean_/median_/std_/pNN_<metric>_ms. `start_times` and `e2els` are our additions
    (seconds, per request) so a plot can be redrawn from the file alone; so is `start_unix`, the
    first send's wall-clock time, which lines the requests up with a server's `--step-log`."""
    recs = run.records
    first_start = min((x.start_time for x in recs), default=0.0)  # once: per record it was O(n^2)
    out = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        **meta,
        "num_prompts": len(recs),
        "request_rate": _rate(run.shape.request_rate),
        "burstiness": run.shape.burstiness,
        "max_concurrency": run.shape.max_concurrency,
        "duration": metrics.duration,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
        "input_lens": [r.prompt_len for r in recs],
        "output_lens": [r.output_len for r in recs],
        "ttfts": [r.ttft for r in recs],
        "itls": [r.itl for r in recs],
        "e2els": [r.latency for r in recs],
        "start_times": [r.start_time - first_start for r in recs],
        "start_unix": time.time() - (time.perf_counter() - first_start),
        "generated_texts": [r.generated_text for r in recs],
        "errors": [r.error for r in recs],
    }
    if metrics.goodput_slos:
        out["goodput_slos_ms"] = metrics.goodput_slos
    for name in LATENCY_METRICS:
        d = metrics.distribution(name)
        out[f"mean_{name}_ms"] = d.mean
        out[f"median_{name}_ms"] = d.median
        out[f"std_{name}_ms"] = d.std
        for p, v in d.percentiles.items():
            out[f"{percentile_key(p)}_{name}_ms"] = v
    return out


def records_from_result(result: dict) -> list[RequestRecord]:
    """Per-request records back from a result JSON this tool wrote (to redraw plots later)."""
    n = len(result["input_lens"])
    starts = result.get("start_times") or [0.0] * n
    return [
        RequestRecord(prompt_len=result["input_lens"][i], expected_output_len=result["output_lens"][i],
                      start_time=starts[i], ttft=result["ttfts"][i], itl=list(result["itls"][i]),
                      latency=result["e2els"][i], output_tokens=result["output_lens"][i],
                      generated_text=result["generated_texts"][i], error=result["errors"][i],
                      success=not result["errors"][i])
        for i in range(n)
    ]


def summary_table(metrics: BenchmarkMetrics, title: str = "Serving Benchmark Result") -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("Successful requests", f"{metrics.completed}"),
        ("Failed requests", f"{metrics.failed}"),
        ("Benchmark duration (s)", f"{metrics.duration:.2f}"),
        ("Total input tokens", f"{metrics.total_input}"),
        ("Total generated tokens", f"{metrics.total_output}"),
        ("Request throughput (req/s)", f"{metrics.request_throughput:.2f}"),
    ]
    if metrics.request_goodput is not None:
        rows.append(("Request goodput (req/s)", f"{metrics.request_goodput:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{metrics.output_throughput:.2f}"),
        ("Peak output token throughput (tok/s)", f"{metrics.max_output_tokens_per_s:.2f}"),
        ("Peak concurrent requests", f"{metrics.max_concurrent_requests}"),
        ("Total token throughput (tok/s)", f"{metrics.total_token_throughput:.2f}"),
    ]
    for name, value in rows:
        t.add_row(name, value)
    for name in LATENCY_METRICS:
        d = metrics.distribution(name)
        label = name.upper() if name != "e2el" else "E2EL"
        t.add_section()
        t.add_row(f"[bold]{METRIC_TITLES[name]}[/bold]", "")
        t.add_row(f"Mean {label} (ms)", f"{d.mean:.2f}")
        t.add_row(f"Median {label} (ms)", f"{d.median:.2f}")
        t.add_row(f"Std {label} (ms)", f"{d.std:.2f}")
        for p, v in d.percentiles.items():
            t.add_row(f"{percentile_key(p).upper()} {label} (ms)", f"{v:.2f}")
    return t


def print_failures(console: Console, run: RunResult, limit: int = 5) -> None:
    errors = [r.error for r in run.records if not r.success]
    if not errors:
        return
    console.print(f"[red]{len(errors)} request(s) failed[/red]; first errors:")
    for e in list(dict.fromkeys(errors))[:limit]:
        console.print(f"  - {e}")
