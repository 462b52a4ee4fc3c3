"""Diagnosis rules: each a small function from evidence to a finding (symptom -> cause -> fix)
or None. Thresholds are named where they are used and say why; a rule that needs a fact it
does not have (a limit, a GPU counter) stays quiet rather than guess.

Severity: "critical" (users are waiting or requests are being redone), "warning" (money or
latency is being lost), "info" (worth knowing, nothing is wrong).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.doctor.evidence import ModelWindow
from tokenmill.doctor.gpu import GpuWindow
from tokenmill.doctor.trace import TraceSummary

SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    rule: str
    severity: str
    title: str
    cause: str
    fix: str  # the change, as the flag to pass where there is one
    evidence: dict[str, object] = field(default_factory=dict)
    where: str = ""  # replica / model, or "fleet"
    score: float = 0.0  # within a severity, larger first: how far past the threshold

    @property
    def rank(self) -> tuple[int, float]:
        return SEVERITY_RANK[self.severity], -self.score


@dataclass
class Evidence:
    windows: list[ModelWindow]
    gpu: GpuWindow | None = None
    trace: TraceSummary | None = None


def _where(w: ModelWindow) -> str:
    return f"{w.replica} ({w.model})"


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


# -- per replica -------------------------------------------------------------------------

# A queue that exists in half the scrapes is the steady state, not a burst.
STEADY = 0.5


def batch_cap_too_low(w: ModelWindow) -> Finding | None:
    """Requests queue while the batch sits at max_num_seqs and the KV pool has room: the cap,
    not memory, is what holds them back."""
    cap = w.max_num_seqs
    if not cap:
        return None
    at_cap = w.share(lambda r, q, kv: r >= cap and q > 0)
    if at_cap < STEADY or w.max_kv_usage >= 0.8:
        return None
    # Enough slots for what was running and waiting, within what the pool held at its fullest.
    wanted = math.ceil(max(r + q for r, q in zip(w.running, w.waiting)))
    fits = math.floor(cap * 0.9 / w.max_kv_usage) if w.max_kv_usage > 0 else wanted
    suggest = max(cap + 1, min(wanted, fits))
    return Finding(
        "batch_cap_too_low", "critical", "The batch cap holds requests in the queue",
        f"in {at_cap:.0%} of the window the batch was full at max_num_seqs={cap} with "
        f"{w.mean_waiting:.1f} requests waiting on average, while the KV pool was at most "
        f"{w.max_kv_usage:.0%} used: memory had room for more",
        f"--max-num-seqs {suggest}",
        {"max_num_seqs": cap, "share_full_and_queued": _r(at_cap), "mean_waiting": _r(w.mean_waiting, 1),
         "max_kv_usage": _r(w.max_kv_usage), "queue_time_p50_s": _r(w.queue.p50)},
        _where(w), at_cap + w.mean_waiting / cap)


def kv_pool_too_small(w: ModelWindow) -> Finding | None:
    """The pool fills and requests are preempted (their KV thrown away and recomputed), or
    they queue with batch slots free because no blocks are left."""
    preemptions = w.deltas.get("vllm:num_preemptions", 0.0)
    cap = w.max_num_seqs or math.inf
    starved = w.share(lambda r, q, kv: q > 0 and r < cap and kv >= 0.85)
    if w.max_kv_usage < 0.85 or (preemptions == 0 and starved < STEADY):
        return None
    blocks = w.limits.get("num_kv_blocks")
    return Finding(
        "kv_pool_too_small", "critical" if preemptions else "warning", "The KV cache pool is too small for the load",
        f"KV usage reached {w.max_kv_usage:.0%}; {preemptions:.0f} preemptions in {w.seconds:.0f} s "
        f"(each recomputes a request's prompt and output so far); requests waited with free batch slots in "
        f"{starved:.0%} of the window",
        "more KV memory (--kv-cache-memory on CPU, --gpu-memory-utilization on GPU"
        + (f"; the pool has {blocks} blocks" if blocks else "") + "), or a lower --max-model-len, or more "
        "replicas / tensor parallelism; a quantized KV cache halves its bytes per token",
        {"max_kv_usage": _r(w.max_kv_usage), "preemptions": preemptions,
         "preemptions_per_s": _r(w.rate("vllm:num_preemptions")), "share_starved": _r(starved),
         "num_kv_blocks": blocks},
        _where(w), preemptions / max(w.seconds, 1) + starved)


def prefix_cache_off(w: ModelWindow) -> Finding | None:
    """Caching is off but prompts repeat what recent prompts began with (a shared system
    prompt, few-shot examples, a multi-turn history): each recomputes it."""
    missed = w.deltas.get("tokenmill:prefix_cache_missed_hits", 0.0)
    prompt = w.deltas.get("vllm:prompt_tokens", 0.0)
    if w.limits.get("enable_prefix_caching", True) or prompt <= 0 or missed / prompt < 0.2:
        return None
    return Finding(
        "prefix_cache_off", "warning", "Prefix caching is off while prompts share their beginnings",
        f"{missed / prompt:.0%} of the {prompt:.0f} prompt tokens in the window had been computed "
        f"by a recent request already (same leading blocks); with caching they would be reused",
        "drop --no-prefix-cache (caching is on by default); with several replicas, route by prefix "
        "(tokenmill router --policy prefix)",
        {"prompt_tokens": prompt, "missed_prefix_hits": missed, "share": _r(missed / prompt)},
        _where(w), missed / prompt)


def prefix_cache_missing(w: ModelWindow) -> Finding | None:
    """Caching is on but hits are rare although requests would share: informational, since
    metrics alone cannot tell unshared prompts from a cache that evicts too early."""
    queries = w.deltas.get("vllm:prefix_cache_queries", 0.0)
    hits = w.deltas.get("vllm:prefix_cache_hits", 0.0)
    if not w.limits.get("enable_prefix_caching", False) or queries < 1000 or hits / queries >= 0.05:
        return None
    if w.max_kv_usage < 0.9:
        return None  # a roomy pool that misses: prompts simply do not share
    return Finding(
        "prefix_cache_evicting", "info", "The prefix cache hits rarely while the pool is full",
        f"hit rate {hits / queries:.1%} with KV usage up to {w.max_kv_usage:.0%}: cached prefixes "
        "are probably evicted before they are reused", "more KV memory, or route by prefix across replicas",
        {"hit_rate": _r(hits / queries, 3), "max_kv_usage": _r(w.max_kv_usage)}, _where(w), 0.0)


def prefill_interference(w: ModelWindow) -> Finding | None:
    """Decode rows share steps with prefill chunks: while a long prompt is chunked through,
    every running request's next token waits for the chunk. Shows as a TPOT p99 far above p50
    while prompts arrive."""
    p50, p99 = w.tpot.p50, w.tpot.p99
    if p50 is None or p99 is None or w.tpot.count < 20 or p99 < 3 * p50:
        return None
    budget = w.limits.get("max_num_batched_tokens")
    finished = w.deltas.get("vllm:request_success", 0.0)
    prompt_len = w.deltas.get("vllm:prompt_tokens", 0.0) / finished if finished else 0.0
    if not budget or prompt_len < budget / 4:
        return None  # prompts that fill a small part of a step's budget do not stall it much
    fix = f"--max-num-batched-tokens {max(64, budget // 2)} (smaller prefill chunks per step)"
    return Finding(
        "prefill_interference", "warning", "Prefill chunks stall the running requests' tokens",
        f"time per output token p99 {p99 * 1e3:.0f} ms vs p50 {p50 * 1e3:.0f} ms while "
        f"{w.rate('vllm:prompt_tokens'):.0f} prompt tokens/s arrived: decode steps carry prefill chunks",
        fix + "; or separate prefill and decode replicas at larger scale",
        {"tpot_p50_ms": _r(p50 * 1e3, 1), "tpot_p99_ms": _r(p99 * 1e3, 1),
         "prompt_tokens_per_s": _r(w.rate("vllm:prompt_tokens"), 1), "mean_prompt_tokens": _r(prompt_len, 1),
         "max_num_batched_tokens": budget},
        _where(w), p99 / p50)


def ttft_is_queueing(w: ModelWindow) -> Finding | None:
    """Time to first token split into waiting for a slot vs computing the prompt: which one
    dominates decides the fix (capacity vs prompt length and chunking)."""
    t, q = w.ttft.p50, w.queue.p50
    if t is None or q is None or t < 0.5 or w.ttft.count < 5:
        return None
    share = min(q / t, 1.0)
    # The queue histogram (and the waiting gauge) also hold the wait for the step in progress
    # to end, since admission happens between steps: on a slow box that is seconds. Waiting for
    # capacity is waiting while the batch is at its cap or the KV pool is full.
    cap = w.max_num_seqs or math.inf
    for_capacity = w.share(lambda r, wq, kv: wq > 0 and (r >= cap or kv >= 0.85))
    if share >= 0.5 and for_capacity >= 0.25:
        return Finding(
            "ttft_is_queueing", "warning", "Time to first token is mostly queueing",
            f"TTFT p50 {t:.2f} s, of which {q:.2f} s ({share:.0%}) waiting to be scheduled: the replica "
            "lacks capacity for the arrival rate (see the batch cap and KV findings, if any)",
            "more replicas (or a higher --max-num-seqs where memory allows)",
            {"ttft_p50_s": _r(t), "queue_p50_s": _r(q), "ttft_p99_s": _r(w.ttft.p99)}, _where(w), share)
    return Finding(
        "ttft_is_compute", "info", "Time to first token is mostly prompt compute",
        f"TTFT p50 {t:.2f} s, of which {q:.2f} s before the first step, but requests rarely waited for a "
        "seat or for memory: the steps themselves are slow for these prompts",
        "shorter prompts, prefix caching of shared parts, or faster hardware for prefill",
        {"ttft_p50_s": _r(t), "queue_p50_s": _r(q)}, _where(w), 1 - share)


# Speculation verifies k drafts per request per step: at small batch that is free (decode is
# bound by reading the weights), at large batch the step is compute-bound and the extra rows
# cost. On this CPU the break-even measured by benchmarks/spec_decode.py was about 8.
SPEC_PAYS_UP_TO = 8


def speculation_not_paying(w: ModelWindow) -> Finding | None:
    drafts = w.deltas.get("vllm:spec_decode_num_draft_tokens", 0.0)
    accepted = w.deltas.get("vllm:spec_decode_num_accepted_tokens", 0.0)
    if not w.limits.get("speculative_method") or drafts < 50:
        return None
    acceptance = accepted / drafts
    busy = w.mean_running > SPEC_PAYS_UP_TO
    if not busy and acceptance >= 0.3:
        return None
    why = (f"drafts were verified with {w.mean_running:.1f} requests running on average (more than "
           f"{SPEC_PAYS_UP_TO}, where a step is compute-bound and verify rows cost what they save)" if busy
           else f"only {acceptance:.0%} of drafts were accepted: most verify work is thrown away")
    return Finding(
        "speculation_not_paying", "warning", "Speculative decoding costs more than it saves here",
        why + f"; {drafts:.0f} draft tokens, {acceptance:.0%} accepted",
        f"--speculative-disable-by-batch-size {SPEC_PAYS_UP_TO}" if busy else "drop --speculative-method",
        {"mean_running": _r(w.mean_running, 1), "draft_tokens": drafts, "acceptance": _r(acceptance),
         "speculative_disable_by_batch_size": w.limits.get("speculative_disable_by_batch_size")},
        _where(w), w.mean_running / SPEC_PAYS_UP_TO if busy else 1 - acceptance)


# -- across the fleet --------------------------------------------------------------------


def uneven_load(windows: list[ModelWindow]) -> Finding | None:
    """Replicas of one model carry very different loads: the router (or the clients) are not
    spreading requests, so one queues while another idles."""
    by_model: dict[str, list[ModelWindow]] = {}
    for w in windows:
        by_model.setdefault(w.model, []).append(w)
    for model, ws in by_model.items():
        if len(ws) < 2:
            continue
        hot = max(ws, key=lambda w: w.mean_load)
        cold = min(ws, key=lambda w: w.mean_load)
        if hot.mean_load < 2 or hot.mean_load < 2 * cold.mean_load + 1:
            continue
        return Finding(
            "uneven_load", "critical" if hot.queued_share >= STEADY else "warning",
            "Load is uneven across replicas",
            f"{hot.replica} carried {hot.mean_load:.1f} requests on average (waiting in {hot.queued_share:.0%} "
            f"of the window) while {cold.replica} carried {cold.mean_load:.1f}",
            "route through `tokenmill router --policy prefix` (or least-load) instead of a fixed or "
            "round-robin split",
            {"loads": {w.replica: _r(w.mean_load, 1) for w in ws}, "hot_queued_share": _r(hot.queued_share)},
            f"fleet ({model})", hot.mean_load / max(cold.mean_load, 0.5))
    return None


def over_provisioned(windows: list[ModelWindow]) -> Finding | None:
    """Nobody waits and the batches are a small part of their cap: the fleet could be smaller.
    A single idle replica is only info (scale to zero or a smaller instance); a fleet that
    would fit in fewer replicas at half their cap is a warning (money)."""
    capped = [w for w in windows if w.max_num_seqs]
    if not capped or any(w.queued_share > 0 for w in capped) or any(w.max_kv_usage > 0.5 for w in capped):
        return None
    util = sum(w.mean_running for w in capped) / sum(w.max_num_seqs for w in capped)
    if util >= 0.25:
        return None
    needed = max(1, math.ceil(sum(w.mean_running for w in capped) / (0.5 * capped[0].max_num_seqs)))
    severity = "warning" if len(capped) > needed else "info"
    return Finding(
        "over_provisioned", severity, "Capacity is mostly idle",
        f"no request waited; batches averaged {util:.0%} of their cap across {len(capped)} replica(s)",
        f"scale to {needed} replica(s) (autoscale to the daily curve)" if severity == "warning"
        else "nothing to change unless the cost matters: a smaller instance, or scale to zero when idle",
        {"mean_batch_share_of_cap": _r(util), "replicas": len(capped), "replicas_needed": needed},
        "fleet", 0.25 - util)


# -- GPU counters ------------------------------------------------------------------------


def gpu_findings(gpu: GpuWindow, windows: list[ModelWindow]) -> list[Finding]:
    out: list[Finding] = []
    running = sum(w.mean_running for w in windows) / max(len(windows), 1) if windows else None
    util, sm = gpu.mean_util, gpu.mean_sm_active
    if util is not None and sm is not None and util >= 0.8 and sm < 0.5:
        out.append(Finding(
            "gpu_utilization_misleads", "info", "utilization.gpu overstates how busy the GPU is",
            f"utilization.gpu {util:.0%} (some kernel was running) but SM active {sm:.0%}: most of the chip "
            "idled inside those kernels", "judge by SM / tensor / DRAM activity (DCGM), not utilization.gpu",
            {"utilization_gpu": _r(util), "sm_active": _r(sm)}, "gpu", util - sm))
    if sm is not None and sm < 0.4 and running is not None and running >= 1:
        out.append(Finding(
            "host_bound", "warning", "The GPU waits for the host between kernels",
            f"SM active {sm:.0%} while {running:.1f} requests were running: steps are short and the CPU "
            "side (scheduling, launches, syncs) sets the pace",
            "keep CUDA graphs on (no --enforce-eager), fewer host syncs per step, larger batches",
            {"sm_active": _r(sm), "mean_running": _r(running, 1)}, "gpu", 0.4 - sm))
    dram, tensor = gpu.mean_dram_active, gpu.mean_tensor_active
    if dram is not None and tensor is not None and dram >= 0.6 and tensor < 0.2 and running is not None and running < 16:
        out.append(Finding(
            "memory_bound_decode", "warning", "Decode is bound by memory bandwidth at a small batch",
            f"DRAM active {dram:.0%}, tensor pipes {tensor:.0%}, {running:.1f} requests running: every step "
            "reads all weights to produce a few tokens",
            "quantize weights (int4/FP8), speculative decoding, or batch more requests per replica",
            {"dram_active": _r(dram), "tensor_active": _r(tensor), "mean_running": _r(running, 1)}, "gpu", dram - tensor))
    share, reasons = gpu.throttled_share()
    if share >= 0.2:
        out.append(Finding(
            "gpu_throttling", "warning", "The GPU is throttling its clocks",
            f"{share:.0%} of samples had {', '.join(reasons)}" + (
                f"; SM clock {sum(gpu.sm_clock_mhz) / len(gpu.sm_clock_mhz):.0f} of {gpu.max_sm_clock_mhz:.0f} MHz"
                if gpu.sm_clock_mhz and gpu.max_sm_clock_mhz else ""),
            "check cooling and power limits (nvidia-smi -q -d PERFORMANCE,POWER)",
            {"throttled_share": _r(share), "reasons": reasons}, "gpu", share))
    return out


# -- a profiler trace ---------------------------------------------------------------------

# Below this share of step time in operators (CPU) or kernels (GPU), the step is paced by
# Python on the host rather than by the arithmetic.
HOST_BOUND_SHARE = 0.6


def trace_findings(t: TraceSummary) -> list[Finding]:
    if not t.steps:
        return []
    top = ", ".join(f"{name} {us / t.step_us:.0%}" for name, us in t.top_ops[:5])
    out = [Finding("step_time", "info", "Where the step time goes (profiler trace)",
                   f"{t.steps} steps, {t.step_us / t.steps / 1e3:.1f} ms each on average; top operators: {top}",
                   "the largest operator is where a faster kernel pays most",
                   {"steps": t.steps, "ms_per_step": round(t.step_us / t.steps / 1e3, 2),
                    "top_ops_ms": {n: round(us / 1e3, 1) for n, us in t.top_ops}}, "trace", 0.0)]
    gpu = t.gpu_busy_share
    if gpu is not None and gpu < HOST_BOUND_SHARE:
        out.append(Finding(
            "host_bound_trace", "warning", "The GPU idles between kernels inside the steps",
            f"kernels ran {gpu:.0%} of the step time: launches, syncs and Python between them set the pace",
            "keep CUDA graphs on (no --enforce-eager), larger batches per step",
            {"gpu_busy_share": _r(gpu), "steps": t.steps}, "trace", HOST_BOUND_SHARE - gpu))
    elif gpu is None and t.cpu_op_share < HOST_BOUND_SHARE:
        out.append(Finding(
            "host_overhead_trace", "warning", "Steps spend much of their time outside torch operators",
            f"operators covered {t.cpu_op_share:.0%} of the step time; the rest is Python in the runner "
            "(batch tensors, attention metadata, sampling bookkeeping)",
            "larger batches amortize the per-step Python (--max-num-seqs), or profile it with py-spy",
            {"cpu_op_share": _r(t.cpu_op_share), "steps": t.steps}, "trace", HOST_BOUND_SHARE - t.cpu_op_share))
    return out


PER_REPLICA: tuple[Callable[[ModelWindow], Finding | None], ...] = (
    batch_cap_too_low, kv_pool_too_small, prefix_cache_off, prefix_cache_missing, prefill_interference,
    ttft_is_queueing, speculation_not_paying)
FLEET: tuple[Callable[[list[ModelWindow]], Finding | None], ...] = (uneven_load, over_provisioned)


def diagnose(evidence: Evidence) -> list[Finding]:
    """Every rule over the evidence, most severe first."""
    found = [f for w in evidence.windows for rule in PER_REPLICA if (f := rule(w)) is not None]
    found += [f for rule in FLEET if (f := rule(evidence.windows)) is not None]
    if evidence.gpu is not None:
        found += gpu_findings(evidence.gpu, evidence.windows)
    if evidence.trace is not None:
        found += trace_findings(evidence.trace)
    return sorted(found, key=lambda f: f.rank)
