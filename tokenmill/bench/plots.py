"""--plot DIR: PNG figures drawn with matplotlib (imported here only, headless backend).

latency_cdf.png      CDFs of TTFT, TPOT, ITL and E2E latency (one curve per sweep point)
sweep_throughput.png output and request throughput versus the swept load
sweep_latency.png    p99 (or the sweep's statistic) TTFT and TPOT versus the swept load
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenmill.bench.metrics import LATENCY_METRICS
from tokenmill.bench.records import RequestRecord
from tokenmill.bench.sweep import SweepResult

LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _values_ms(records: Sequence[RequestRecord], name: str) -> list[float]:
    ok = [r for r in records if r.success]
    if name == "ttft":
        vals = [r.ttft for r in ok]
    elif name == "tpot":
        vals = [r.tpot for r in ok if r.tpot is not None]
    elif name == "itl":
        vals = [g for r in ok for g in r.itl]
    else:
        vals = [r.latency for r in ok]
    return sorted(v * 1000.0 for v in vals)


def plot_latency_cdfs(series: dict[str, Sequence[RequestRecord]], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, LATENCY_METRICS):
        for label, records in series.items():
            vals = _values_ms(records, name)
            if vals:
                ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label=label)
        if name == "itl":
            ax.set_xscale("log")  # a few prefill stalls would otherwise squash the body to a line
        ax.set_xlabel(f"{LABELS[name]} (ms)")
        ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{LABELS[name]} CDF")
    if len(series) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweep: SweepResult, out_dir: Path, title: str = "") -> list[Path]:
    plt = _pyplot()
    xs = [p.value for p in sweep.points]
    xlabel = "request rate (req/s)" if sweep.spec.kind == "rate" else "max concurrency"
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [p.metrics.output_throughput for p in sweep.points], "o-", label="output tok/s")
    ax.plot(xs, [p.metrics.total_token_throughput for p in sweep.points], "s--", label="total tok/s")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(xs, [p.metrics.request_throughput for p in sweep.points], "^:", color="gray", label="req/s")
    ax2.set_ylabel("requests/s")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(title or "throughput vs load")
    fig.tight_layout()
    paths.append(out_dir / "sweep_throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    stat = sweep.stat
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, name in zip(axes, ("ttft", "tpot")):
        ys = [p.metrics.stat_value(name, stat) for p in sweep.points]
        colors = ["tab:green" if p.meets_slo else "tab:red" if p.meets_slo is False else "tab:blue" for p in sweep.points]
        ax.plot(xs, ys, "-", color="tab:blue")
        ax.scatter(xs, ys, c=colors, zorder=3)
        if name in sweep.slos:
            ax.axhline(sweep.slos[name], color="tab:red", ls="--", label=f"SLO {sweep.slos[name]:g} ms")
            ax.legend()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{stat} {LABELS[name]} (ms)")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{stat} latency vs load")
    fig.tight_layout()
    paths.append(out_dir / "sweep_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
