"""`tokenmill bench` flags and entry point: add_bench_arguments() + run_bench().

Flag names follow `vllm bench serve` where it has one, so a command line carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmill.bench.client import BACKENDS, RequestSettings
from tokenmill.bench.datasets import SampleRequest, random_dataset, sharegpt_dataset, synthetic_dataset
from tokenmill.bench.metrics import (
    DEFAULT_PERCENTILES,
    BenchmarkMetrics,
    compute_metrics,
    fill_output_tokens,
    parse_goodput,
)
from tokenmill.bench.report import print_failures, result_dict, summary_table
from tokenmill.bench.runner import LoadShape, RunResult, run_load
from tokenmill.bench.sweep import SweepResult, SweepSpec, run_sweep
from tokenmill.bench.tokenizer import DEFAULT_TOKENIZER, BenchTokenizer, load_tokenizer

DATASETS = ("random", "sharegpt", "synthetic")


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (a number of requests/s or inf)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 (or inf), got {text!r}")
    return value


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percentiles: {text!r} (e.g. 50,90,99)") from None
    if not values or any(not 0 <= p <= 100 for p in values):
        raise argparse.ArgumentTypeError(f"percentiles must be within [0, 100]: {text!r}")
    return values


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    s.add_argument("--backend", choices=BACKENDS, default="completions", help="/v1/completions or /v1/chat/completions")
    s.add_argument("--api-key", default=None, help="sent as a Bearer token")
    s.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer.json, .gguf, HF dir, or {DEFAULT_TOKENIZER!r} (builds random prompts, recounts output)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request before it fails")
    s.add_argument("--label", default=None, help="name of this run in the JSON and plots (default: --base-url)")

    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", choices=DATASETS, default="random")
    d.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (for --dataset-name sharegpt)")
    d.add_argument("--num-prompts", type=int, default=100)
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in [len*(1-r), len*(1+r)]")
    d.add_argument("--random-prefix-len", type=int, default=0, help="tokens of one shared prefix before every prompt")
    d.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length (default: the reply's)")
    d.add_argument("--synthetic-max-output-len", type=int, default=None, help="cap the replies' output lengths")
    d.add_argument("--synthetic-max-context", type=int, default=2048, help="history budget in tokens")

    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s; inf sends all at once")
    g.add_argument("--burstiness", type=float, default=1.0, help="1: Poisson; <1 burstier; >1 more regular (gamma)")
    g.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-warmups", type=int, default=0, help="requests sent first and left out of the figures")
    g.add_argument("--sweep", default=None, metavar="rate:R1,R2,..|concurrency:C1,C2,..",
                   help="run each load in turn; with --goodput, report the highest meeting the SLO")
    g.add_argument("--sweep-stat", default="p99", help="statistic the sweep judges the SLO on: mean, median, pNN")
    g.add_argument("--ignore-eos", action="store_true", help="generate exactly the asked output lengths")
    g.add_argument("--temperature", type=float, default=0.0)

    o = p.add_argument_group("metrics and output")
    o.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", type=_percentiles,
                   default=list(DEFAULT_PERCENTILES), help="comma-separated, default 50,90,99")
    o.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput (and --sweep), e.g. ttft:500 tpot:50 e2el:5000")
    o.add_argument("--result-json", default=None, help="write per-request records and the summary here")
    o.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")


def _samples(args: argparse.Namespace, tok: BenchTokenizer, seed: int) -> tuple[list[SampleRequest], SampleRequest]:
    """The measured samples plus one more for the warm-ups (never one of the measured prompts)."""
    n = args.num_prompts + 1
    if args.dataset_name == "random":
        out = random_dataset(tok, n, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, args.random_prefix_len, seed)
    elif args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE.json")
        out = sharegpt_dataset(tok, args.dataset_path, n, args.sharegpt_output_len, seed)
    else:
        out = synthetic_dataset(tok, n, seed, args.synthetic_max_output_len, args.synthetic_max_context)
    return out[:-1], out[-1]


def discover_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=10.0, trust_env=False)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"could not read the model name from {base_url}/v1/models ({e}); pass --model") from e


def _validate(args: argparse.Namespace) -> tuple[dict[str, float], SweepSpec | None]:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.num_warmups < 0:
        raise ValueError("--num-warmups must be >= 0")
    slos = parse_goodput(args.goodput)
    sweep = SweepSpec.parse(args.sweep) if args.sweep else None
    stat = args.sweep_stat
    if stat not in ("mean", "median"):
        try:
            p = float(stat.removeprefix("p"))
        except ValueError:
            raise ValueError(f"--sweep-stat {stat!r}: use mean, median or pNN") from None
        if p not in args.percentiles:
            args.percentiles = sorted([*args.percentiles, p])
    return slos, sweep


class _LiveProgress:
    """A rich progress bar fed by the runner's per-request callbacks."""

    def __init__(self, console: Console, enabled: bool):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), console=console, disable=not enabled,
        )

    def task(self, description: str, total: int):
        task_id = self.progress.add_task(description, total=total, failed=0)
        failed = 0

        def done(rec) -> None:
            nonlocal failed
            failed += 0 if rec.success else 1
            self.progress.update(task_id, advance=1, failed=failed)

        return done


async def _bench(args: argparse.Namespace, console: Console) -> int:
    slos, sweep_spec = _validate(args)
    model = args.model or discover_model(args.base_url, args.api_key)
    settings = RequestSettings(args.base_url, model, args.backend, args.ignore_eos, args.temperature, args.api_key)
    tok = load_tokenizer(args.tokenizer)
    base = LoadShape(args.request_rate, args.burstiness, args.max_concurrency, args.seed)
    label = args.label or args.base_url
    meta = {"backend": args.backend, "label": label, "base_url": args.base_url, "model_id": model,
            "tokenizer_id": args.tokenizer, "dataset_name": args.dataset_name, "ignore_eos": args.ignore_eos}
    live = _LiveProgress(console, enabled=not args.no_progress)

    points = 0

    async def run_point(shape: LoadShape) -> tuple[RunResult, BenchmarkMetrics]:
        nonlocal points
        # Fresh prompts per sweep point: the same prompts again would be prefix-cache hits.
        samples, warmup = _samples(args, tok, args.seed + points)
        points += 1
        with live.progress:
            warm = live.task("warm-up", args.num_warmups) if args.num_warmups else None
            done = live.task(shape.label, len(samples))
            run = await run_load(settings, samples, shape, args.num_warmups, warmup, args.request_timeout, done, warm)
        fill_output_tokens(run.records, tok.count)
        metrics = compute_metrics(run.records, run.duration, args.percentiles, slos)
        console.print(summary_table(metrics, f"{label}: {shape.label}"))
        print_failures(console, run)
        return run, metrics

    if sweep_spec is None:
        run, metrics = await run_point(base)
        result: dict = result_dict(run, metrics, meta)
        completed = metrics.completed
        if args.plot:
            from tokenmill.bench.plots import plot_latency_cdfs

            out = Path(args.plot)
            out.mkdir(parents=True, exist_ok=True)
            console.print(f"plot: {plot_latency_cdfs({label: run.records}, out / 'latency_cdf.png', label)}")
    else:
        sweep = await run_sweep(sweep_spec, base, slos, run_point, args.sweep_stat)
        _print_sweep(console, sweep)
        result = _sweep_dict(sweep, meta)
        completed = sum(p.metrics.completed for p in sweep.points)
        if args.plot:
            from tokenmill.bench.plots import plot_latency_cdfs, plot_sweep

            out = Path(args.plot)
            out.mkdir(parents=True, exist_ok=True)
            kind = sweep_spec.kind
            series = {f"{kind} {p.value:g}": p.run.records for p in sweep.points}
            paths = [plot_latency_cdfs(series, out / "latency_cdf.png", label), *plot_sweep(sweep, out, label)]
            for path in paths:
                console.print(f"plot: {path}")
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        console.print(f"result: {path}")
    return 0 if completed else 1


def _print_sweep(console: Console, sweep: SweepResult) -> None:
    from rich.table import Table

    t = Table(title=f"sweep over {sweep.spec.kind} (SLO judged on {sweep.stat})", title_justify="left")
    for col in (sweep.spec.kind, "req/s", "output tok/s", f"{sweep.stat} TTFT ms", f"{sweep.stat} TPOT ms", "failed", "SLO"):
        t.add_column(col, justify="right")
    for p in sweep.points:
        m = p.metrics
        slo = "-" if p.meets_slo is None else "[green]met[/green]" if p.meets_slo else "[red]missed[/red]"
        t.add_row(f"{p.value:g}", f"{m.request_throughput:.2f}", f"{m.output_throughput:.1f}",
                  f"{m.stat_value('ttft', sweep.stat):.1f}", f"{m.stat_value('tpot', sweep.stat):.1f}",
                  f"{m.failed}", slo)
    console.print(t)
    if sweep.slos:
        best = sweep.best
        bounds = ", ".join(f"{k} <= {v:g} ms" for k, v in sweep.slos.items())
        if best is None:
            console.print(f"no {sweep.spec.kind} met the SLO ({bounds})")
        else:
            console.print(f"highest {sweep.spec.kind} meeting the SLO ({bounds}): {best.value:g}")


def _sweep_dict(sweep: SweepResult, meta: dict) -> dict:
    best = sweep.best
    return {
        "sweep": {
            "kind": sweep.spec.kind,
            "values": [v if math.isfinite(v) else "inf" for v in sweep.spec.values],
            "slos_ms": sweep.slos,
            "stat": sweep.stat,
            "best": None if best is None else (best.value if math.isfinite(best.value) else "inf"),
            "stopped_early": sweep.stopped_early,
        },
        "runs": [{"sweep_value": p.value if math.isfinite(p.value) else "inf", "meets_slo": p.meets_slo,
                  **result_dict(p.run, p.metrics, meta)} for p in sweep.points],
    }


def run_bench(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    try:
        return asyncio.run(_bench(args, console))
    except ValueError as e:
        console.print(f"[red]tokenmill bench: {e}[/red]")
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill bench", description="Benchmark an OpenAI-compatible server.")
    add_bench_arguments(parser)
    try:
        return run_bench(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
