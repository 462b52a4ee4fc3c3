"""The report: ranked findings with their evidence and the change to make, as markdown (for a
ticket or a file) or in the terminal, and a picture of the window (running, waiting, KV usage,
generated tokens/s per replica)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.doctor.evidence import ModelWindow
from tokenmill.doctor.rules import Finding

ICON = {"critical": "CRITICAL", "warning": "WARNING", "info": "info"}


def summary_line(windows: list[ModelWindow], seconds: float) -> str:
    replicas = len({w.replica for w in windows})
    gen = sum(w.rate("vllm:generation_tokens") for w in windows)
    done = sum(w.finished for w in windows)
    return (f"{replicas} replica(s), {len(windows)} model window(s), {seconds:.0f} s observed: "
            f"{gen:.1f} generated tokens/s, {done:.0f} requests finished")


def markdown(findings: list[Finding], windows: list[ModelWindow], seconds: float, picture: str | None = None) -> str:
    lines = ["# tokenmill doctor", "", summary_line(windows, seconds), ""]
    if not findings:
        lines += ["No findings: nothing queues, nothing is preempted, nothing idles beyond what the rules flag.", ""]
    for i, f in enumerate(findings, 1):
        lines += [f"## {i}. [{ICON[f.severity]}] {f.title}", "", f"*Where*: {f.where}  ", f"*Rule*: `{f.rule}`", "",
                  f"**Cause.** {f.cause[:1].upper()}{f.cause[1:]}.", "", f"**Change.** `{f.fix}`" if f.fix.startswith("--") else f"**Change.** {f.fix}",
                  ""] + _predicted(f) + ["Evidence: `" + json.dumps(f.evidence, default=str) + "`", ""]
    if picture:
        lines += [f"![the window]({picture})", ""]
    return "\n".join(lines)


def _predicted(f: Finding) -> list[str]:
    p = f.evidence.get("predicted")
    if not p:
        return []
    b, a = p["before"], p["after"]
    return [f"**Predicted** (`{p['by']}` on this window's workload): TTFT p50 {b['ttft_p50_ms']} -> "
            f"{a['ttft_p50_ms']} ms, TPOT p50 {b['tpot_p50_ms']} -> {a['tpot_p50_ms']} ms, output "
            f"{b['output_tok_s']} -> {a['output_tok_s']} tok/s.", ""]


def print_terminal(findings: list[Finding], windows: list[ModelWindow], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]tokenmill doctor[/bold]  {summary_line(windows, seconds)}")
    if not findings:
        console.print("No findings.")
        return
    table = Table(show_lines=True)
    for col in ("#", "severity", "finding", "cause", "change"):
        table.add_column(col)
    style = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
    for i, f in enumerate(findings, 1):
        change = f.fix + "".join("\n" + line for line in _predicted(f) if line)
        table.add_row(str(i), f"[{style[f.severity]}]{f.severity}[/]", f"{f.title}\n({f.where})", f.cause, change)
    console.print(table)


def plot(windows: list[ModelWindow], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for w in windows:
        label = f"{w.replica.split('//')[-1]} {w.model}"
        axes[0].plot(w.times, w.running, label=f"running {label}")
        axes[0].plot(w.times, w.waiting, "--", label=f"waiting {label}")
        axes[1].plot(w.times, [u * 100 for u in w.kv_usage], label=label)
    axes[0].set_ylabel("requests")
    axes[1].set_ylabel("KV usage %")
    axes[1].set_ylim(0, 105)
    for w in windows:
        axes[2].bar([w.replica.split("//")[-1] + " " + w.model], [w.rate("vllm:generation_tokens")])
    axes[2].set_ylabel("generated tok/s")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    axes[1].set_xlabel("seconds into the window")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
