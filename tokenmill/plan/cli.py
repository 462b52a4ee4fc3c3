"""`tokenmill plan simulate | calibrate | search`: the flags and what each command prints."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

from tokenmill.config import EngineConfig

CPU = "cpu-2core"


def _rate(text: str) -> float:
    return math.inf if text == "inf" else float(text)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replica")
    g.add_argument("--model", default="smollm2-135m", help="catalog model name or a path to an HF config.json")
    g.add_argument("--catalog", default=None, help="a catalog JSON of your own (default: tokenmill/plan/catalog.json)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's (64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's (512)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="CPU KV budget in bytes (default: the engine's)")
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-prefix-cache", action="store_true")
    g.add_argument("--max-model-len", type=int, default=8192)
    w = p.add_argument_group("workload (as tokenmill bench names it)")
    w.add_argument("--num-prompts", type=int, default=200)
    w.add_argument("--request-rate", type=_rate, default=math.inf)
    w.add_argument("--burstiness", type=float, default=1.0)
    w.add_argument("--random-input-len", type=int, default=256)
    w.add_argument("--random-output-len", type=int, default=64)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--random-prefix-len", type=int, default=0)
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--think-time", type=float, default=0.0, help="closed loop: mean seconds a user rests between requests")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="plan_command", required=True)
    s = sub.add_parser("simulate", help="one fleet on a workload: the metrics tokenmill bench reports")
    s.add_argument("--hardware", default=CPU)
    s.add_argument("--tp", type=int, default=1)
    s.add_argument("--weight-format", default=None, help="bf16, fp8, int8, int4, q4_1 (default: q4_1 on CPU, bf16 else)")
    s.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for hardware+format, else defaults)")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--policy", default="least-load", help="router policy (tokenmill.router.policy)")
    s.add_argument("--replay", default=None, help="a tokenmill bench --result-json file: replay its arrivals and lengths")
    s.add_argument("--duration", type=float, default=None, help="seconds of traffic at --request-rate (instead of --num-prompts)")
    s.add_argument("--result-json", default=None)
    s.add_argument("--sample-replicas", type=int, default=None, metavar="M",
                   help="APPROXIMATE: simulate M of the --replicas with their share (M/replicas) of the requests "
                        "and of --max-concurrency; latencies are the sample's, throughputs scaled to the fleet")
    s.add_argument("--no-fast-forward", action="store_true",
                   help="run every step through the scheduler (same result, slower; for checking)")
    _common(s)

    c = sub.add_parser("calibrate", help="fit this machine's efficiencies on the real engine; write a profile")
    c.add_argument("--hardware", default=CPU, help="catalog name of the device the engine runs on")
    c.add_argument("--weight-format", default=None, help="default: q4_1 on CPU (the default GGUF), bf16 else")
    c.add_argument("--engine-model", default="smollm2", help="the model the engine loads")
    c.add_argument("--model", default="smollm2-135m", help="its catalog shape (or HF config.json)")
    c.add_argument("--num-threads", type=int, default=None)
    c.add_argument("--output-len", type=int, default=8)
    c.add_argument("--batches", nargs="+", type=int, default=None, help="requests per grid point (default 1 4 8)")
    c.add_argument("--prompt-lens", nargs="+", type=int, default=None, help="prompt lengths (default 32 192)")
    c.add_argument("--step-log", nargs="+", default=None, metavar="FILE",
                   help="fit the steps a running server logged (`tokenmill serve --step-log FILE`) instead of "
                        "running the engine here: what serving costs, HTTP front and clients included")
    c.add_argument("--bench-result", nargs="+", default=None, metavar="FILE",
                   help="with --step-log: `tokenmill bench --result-json` files of runs against that server; "
                        "fits the front's latency outside the steps (send to engine, step end to client)")
    c.add_argument("--output", required=True, help="profile JSON to write")

    r = sub.add_parser("search", help="cheapest fleet meeting an SLO: device x TP x format x batch")
    r.add_argument("--hardware", nargs="+", default=["H100", "H200", "B200", "MI300X", "A100", "L40S"])
    r.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8])
    r.add_argument("--weight-format", nargs="+", default=["bf16", "fp8"])
    r.add_argument("--batch", nargs="+", type=int, default=[64, 256], help="max_num_seqs values to try")
    r.add_argument("--slo", nargs="+", default=["ttft:500"], metavar="NAME:MS", help="met at --slo-stat (ttft, tpot, e2el)")
    r.add_argument("--slo-stat", default="p99")
    r.add_argument("--users", type=int, default=None, help="concurrent users (with --think-time: the offered rate)")
    r.add_argument("--total-rate", type=float, default=None, help="requests/s for the whole fleet")
    r.add_argument("--spot", action="store_true", help="price at spot rates")
    r.add_argument("--plot", default=None, help="PNG: fleet cost vs throughput per replica")
    r.add_argument("--json", default=None, help="write the ranked table here")
    r.add_argument("--top", type=int, default=15)
    _common(r)
    r.set_defaults(num_prompts=300, max_num_batched_tokens=None)


def _config(args, max_num_seqs: int | None = None) -> EngineConfig:
    flat = dict(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                enable_prefix_caching=not args.no_prefix_cache, max_waiting_requests=10**9)
    seqs = max_num_seqs or args.max_num_seqs
    if seqs:
        flat["max_num_seqs"] = seqs
    if args.max_num_batched_tokens:
        flat["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_memory:
        flat["kv_cache_memory_bytes"] = args.kv_cache_memory
    if args.num_kv_blocks:
        flat["num_kv_blocks"] = args.num_kv_blocks
    return EngineConfig.from_flat(**flat)


def _spec(args, hardware: str, tp: int, fmt: str | None, profile_path: str | None = None, max_num_seqs=None):
    from tokenmill.plan.catalog import hardware as hw_named
    from tokenmill.plan.catalog import model_shape
    from tokenmill.plan.cost import Profile, default_profile
    from tokenmill.plan.memory import CPU_KV_BYTES
    from tokenmill.plan.replica import ReplicaSpec

    hw = hw_named(hardware, args.catalog)
    fmt = fmt or ("q4_1" if hardware.startswith("cpu") else "bf16")
    profile = Profile.load(profile_path) if profile_path else default_profile(hardware, fmt)
    if hardware.startswith("cpu") and not profile_path and profile.source != "calibrated":
        profile = Profile(hardware, fmt, kv_bytes=CPU_KV_BYTES)
    return ReplicaSpec(model_shape(args.model, args.catalog), hw, tp, profile, _config(args, max_num_seqs),
                       args.max_model_len)


def _trace(args, rate: float | None = None, num: int | None = None):
    from tokenmill.plan.workload import synthetic

    return synthetic(num or args.num_prompts, args.request_rate if rate is None else rate, args.random_input_len,
                     args.random_output_len, args.random_range_ratio, args.random_prefix_len, args.burstiness, args.seed)


def run_plan(args: argparse.Namespace) -> int:
    return {"simulate": simulate, "calibrate": calibrate, "search": search}[args.plan_command](args)


def simulate(args) -> int:
    from rich.console import Console

    from tokenmill.bench.metrics import parse_goodput
    from tokenmill.bench.report import result_dict, summary_table
    from tokenmill.bench.runner import LoadShape, RunResult
    from tokenmill.plan.workload import from_bench_result

    spec = _spec(args, args.hardware, args.tp, args.weight_format, args.profile)
    if args.replay:
        trace = from_bench_result(args.replay, args.random_prefix_len)
    else:
        num = int(args.duration * args.request_rate) if args.duration and math.isfinite(args.request_rate) else None
        trace = _trace(args, num=num)
    simulated, concurrency, scale = args.replicas, args.max_concurrency, 1.0
    if args.sample_replicas and args.sample_replicas < args.replicas:
        from tokenmill.plan.workload import thin

        if args.sample_replicas < 1:
            raise SystemExit("--sample-replicas must be at least 1")
        simulated, scale = args.sample_replicas, args.replicas / args.sample_replicas
        trace = thin(trace, 1 / scale, args.seed)
        if concurrency:
            concurrency = max(1, round(concurrency / scale))
    large = len(trace) > 200_000
    sim = spec.simulator(simulated, policy=args.policy, seed=args.seed, max_concurrency=concurrency,
                         think_time_s=args.think_time, record_itl=not large, goodput_slos=parse_goodput(args.goodput),
                         fast_forward=not args.no_fast_forward)
    t0, c0 = time.perf_counter(), time.process_time()
    res = sim.run(trace)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    console = Console(width=200)
    console.print(f"{spec.label}, {args.replicas} replica(s) of {spec.num_blocks} KV blocks; profile: {spec.profile.source}")
    title = "Simulated Serving Result"
    if scale != 1.0:
        title += f" (APPROXIMATE: {simulated} of {args.replicas} replicas sampled; throughputs are the sample's)"
    console.print(summary_table(res.metrics, title=title))
    if scale != 1.0:
        m = res.metrics
        console.print(f"[bold]APPROXIMATE[/bold] fleet of {args.replicas}: x{scale:g} the sample's throughput: "
                      f"{m.request_throughput * scale:.2f} req/s, {m.output_throughput * scale:.2f} output tok/s "
                      f"(latencies: the sample's; exact only if replicas were independent, which a balancing "
                      f"router across all {args.replicas} makes approximately true)")
    console.print(f"steps {res.num_steps}, preemptions {res.num_preemptions}, prefix hit rate "
                  f"{res.prefix_hit_rate:.1%}, replica utilization {res.utilization:.1%}; "
                  f"simulated {res.duration:.1f} s in {wall:.1f} s of wall time ({cpu:.1f} s of CPU)" + (" (ITL not recorded)" if large else ""))
    if args.result_json:
        run = RunResult(LoadShape(args.request_rate, args.burstiness, args.max_concurrency, args.seed), res.records,
                        res.duration, [])
        out = result_dict(run, res.metrics, {"backend": "tokenmill-plan", "model_id": args.model, "label": spec.label,
                                              "num_preemptions": res.num_preemptions, "prefix_hit_rate": res.prefix_hit_rate,
                                              "simulation_wall_s": wall, "simulation_cpu_s": cpu, "num_steps": res.num_steps,
                                              "approximate": scale != 1.0, "simulated_replicas": simulated,
                                              "fleet_replicas": args.replicas,
                                              "fleet_request_throughput": res.metrics.request_throughput * scale,
                                              "fleet_output_throughput": res.metrics.output_throughput * scale,
                                              "timeline": [p.__dict__ for p in res.timeline]})
        with open(args.result_json, "w") as f:
            json.dump(out, f)
    return 0


def calibrate(args) -> int:
    from tokenmill.plan import calibrate as cal
    from tokenmill.plan.catalog import hardware, model_shape
    from tokenmill.plan.cost import Profile
    from tokenmill.plan.front import front_latency
    from tokenmill.plan.memory import GPU_KV_BYTES, kv_element_bytes

    if args.bench_result and not args.step_log:
        raise ValueError("--bench-result needs --step-log: the requests are lined up with the server's steps")
    fmt = args.weight_format or ("q4_1" if args.hardware.startswith("cpu") else "bf16")
    config = EngineConfig.from_flat(model=args.engine_model, num_threads=args.num_threads)
    # The bytes per KV element of the engine being measured (its kv_cache_dtype).
    kv_bytes = (kv_element_bytes(config.cache.kv_cache_dtype, model_shape(args.model).head_dim)
                if args.hardware.startswith("cpu") else GPU_KV_BYTES)
    facts = cal.machine_facts()
    t0 = time.perf_counter()
    grid = cal.DEFAULT_GRID
    if args.batches or args.prompt_lens:
        grid = [(b, n) for b in args.batches or (1, 4, 8) for n in args.prompt_lens or (32, 192)]
    if args.step_log:
        samples = cal.samples_from_step_log(args.step_log)
        if len(samples) < 8:
            raise ValueError(f"--step-log: {len(samples)} steps logged; the fit needs at least 8")
    else:
        samples = cal.measure(config, grid, output_len=args.output_len)
    row_block = cal.CPU_ROW_BLOCK if args.hardware.startswith("cpu") else 1
    profile = cal.fit(samples, model_shape(args.model), hardware(args.hardware),
                      Profile(args.hardware, fmt, kv_bytes=kv_bytes, row_block=row_block))
    front = {}
    if args.bench_result:
        latency = front_latency(args.step_log, args.bench_result)
        if latency is None:
            raise ValueError("--bench-result: fewer than 5 requests were sent alone to an idle engine; "
                             "add a run with --max-concurrency 1")
        profile = Profile(**{**profile.__dict__, "ingress_s": latency.ingress_s, "egress_s": latency.egress_s})
        front = {"front_requests": latency.requests}
    fit = {**profile.fit, **front, **facts, "load_avg_1m_after": cal.machine_facts()["load_avg_1m"],
           "num_threads": args.num_threads, "engine_model": args.engine_model, "measure_s": time.perf_counter() - t0,
           "measured": "steps logged by a running server: " + " ".join(args.step_log) if args.step_log
           else "the engine run offline (engine.step() timed alone)"}
    profile = Profile(**{**profile.__dict__, "fit": fit})
    profile.save(args.output)
    print(json.dumps(profile.__dict__, indent=2))
    return 0


def search(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmill.bench.metrics import parse_goodput
    from tokenmill.plan import search as srch

    slos = parse_goodput(args.slo)
    capacities = []
    console = Console(width=200)
    t0 = time.perf_counter()
    for hw, tp, fmt, batch in itertools.product(args.hardware, args.tp, args.weight_format, args.batch):
        spec = _spec(args, hw, tp, fmt, max_num_seqs=batch)
        if fmt in ("fp8",) and not spec.hw.fp8_tflops:
            continue
        if not spec.fits:
            console.print(f"[dim]{spec.label}: the weights leave no room for a context of KV[/dim]")
            continue
        cap = srch.max_rate(spec, lambda rate: _trace(args, rate), slos, stat=args.slo_stat)
        console.print(f"{spec.label}: {cap.max_rate:.2f} req/s per replica ({spec.num_blocks} KV blocks)")
        capacities.append(cap)
    total = args.total_rate
    if total is None and args.users:
        # Little's law for a closed loop: each user sends one request per (think + response) seconds.
        e2e = max((c.metrics.e2el.median / 1000 for c in capacities if c.metrics), default=0.0)
        total = args.users / (args.think_time + e2e)
        console.print(f"{args.users} users, think {args.think_time:.0f} s, response ~{e2e:.1f} s -> {total:.1f} req/s offered")
    total = total or 1.0
    options = srch.cheapest(capacities, total, args.spot)
    table = Table(title=f"cheapest fleets for {total:.1f} req/s, SLO {args.slo} at {args.slo_stat}")
    for col in ("config", "req/s per replica", "tok/s per replica", "replicas", "chips", "$/hour", "$/month", "$/M out tok",
                f"TTFT {args.slo_stat} ms", f"TPOT {args.slo_stat} ms"):
        table.add_column(col, justify="right")
    for o in options[: args.top]:
        m = o.capacity.metrics
        table.add_row(o.spec.label, f"{o.capacity.max_rate:.2f}", f"{o.capacity.output_tokens_per_s:.0f}", str(o.replicas),
                      str(o.chips), f"{o.dollars_per_hour:,.0f}", f"{o.dollars_per_month:,.0f}",
                      f"{o.dollars_per_million_tokens:.3f}", f"{m.stat_value('ttft', args.slo_stat):.0f}",
                      f"{m.stat_value('tpot', args.slo_stat):.1f}")
    console.print(table)
    console.print(f"search took {time.perf_counter() - t0:.0f} s")
    if args.plot:
        console.print(f"plot: {srch.plot(options, args.plot)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"config": o.spec.label, "max_rate": o.capacity.max_rate, "replicas": o.replicas, "chips": o.chips,
                        "dollars_per_hour": o.dollars_per_hour, "dollars_per_million_tokens": o.dollars_per_million_tokens,
                        "output_tokens_per_s": o.capacity.output_tokens_per_s} for o in options], f, indent=1)
    return 0
