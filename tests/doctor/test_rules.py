"""The rules on synthetic windows: each fires on its symptom and stays quiet just short of it;
and the readers (exposition, histogram quantiles, recording files, GPU counters)."""

from __future__ import annotations

import pytest

from tokenmill.doctor import rules
from tokenmill.doctor.evidence import Latency, ModelWindow, histogram_quantile, windows
from tokenmill.doctor.gpu import read_dcgm_scrapes, read_nvidia_smi_csv
from tokenmill.doctor.recording import Recording, ReplicaRecording, Scrape, parse_exposition

LIMITS = {"max_num_seqs": 8, "max_num_batched_tokens": 512, "num_kv_blocks": 100, "enable_prefix_caching": True,
          "speculative_method": None, "num_speculative_tokens": 0, "speculative_disable_by_batch_size": 8}


def window(running, waiting, kv, deltas=None, replica="http://a", seconds=10.0, **kw) -> ModelWindow:
    n = len(running)
    limits = {**LIMITS, **kw.pop("limits", {})}
    return ModelWindow(replica, "m", seconds, [i * seconds / (n - 1) for i in range(n)], list(running), list(waiting),
                       list(kv), dict(deltas or {}), limits=limits, **kw)


def test_batch_cap_fires_when_the_queue_waits_on_a_full_batch_with_memory_free():
    w = window([8] * 10, [6] * 10, [0.3] * 10)
    f = rules.batch_cap_too_low(w)
    assert f is not None and f.severity == "critical"
    assert f.fix == "--max-num-seqs 14"  # what ran and waited, within what memory holds (8 * 0.9 / 0.3 = 24)
    assert rules.batch_cap_too_low(window([8] * 10, [6] * 10, [0.85] * 10)) is None  # memory is the limit
    assert rules.batch_cap_too_low(window([8] * 10, [0] * 4 + [6] * 6, [0.3] * 10)) is not None
    assert rules.batch_cap_too_low(window([8] * 10, [0] * 6 + [6] * 4, [0.3] * 10)) is None  # a burst
    assert rules.batch_cap_too_low(window([7] * 10, [6] * 10, [0.3] * 10)) is None  # below the cap


def test_kv_pool_fires_on_preemptions_or_a_queue_with_slots_free():
    assert rules.kv_pool_too_small(window([3] * 10, [0] * 10, [0.95] * 10, {"vllm:num_preemptions": 4})).severity == "critical"
    assert rules.kv_pool_too_small(window([3] * 10, [2] * 10, [0.9] * 10)).severity == "warning"
    assert rules.kv_pool_too_small(window([3] * 10, [0] * 10, [0.95] * 10)) is None  # full but nobody waits
    assert rules.kv_pool_too_small(window([3] * 10, [2] * 10, [0.5] * 10, {"vllm:num_preemptions": 4})) is None


def test_prefix_cache_off_needs_caching_off_and_repeated_prefixes():
    off = {"limits": {"enable_prefix_caching": False}}
    shared = {"vllm:prompt_tokens": 1000, "tokenmill:prefix_cache_missed_hits": 600}
    assert rules.prefix_cache_off(window([2] * 5, [0] * 5, [0.1] * 5, shared, **off)) is not None
    assert rules.prefix_cache_off(window([2] * 5, [0] * 5, [0.1] * 5, shared)) is None  # caching on
    assert rules.prefix_cache_off(window([2] * 5, [0] * 5, [0.1] * 5, {**shared, "tokenmill:prefix_cache_missed_hits": 100},
                                         **off)) is None


def test_prefill_interference_needs_a_wide_tpot_spread_and_long_prompts():
    wide = Latency(50, 0.05, 0.30)
    long_prompts = {"vllm:prompt_tokens": 50 * 400, "vllm:request_success": 50}
    assert rules.prefill_interference(window([4] * 5, [0] * 5, [0.2] * 5, long_prompts, tpot=wide)).fix.startswith(
        "--max-num-batched-tokens 256")
    short = {"vllm:prompt_tokens": 50 * 20, "vllm:request_success": 50}
    assert rules.prefill_interference(window([4] * 5, [0] * 5, [0.2] * 5, short, tpot=wide)) is None
    narrow = Latency(50, 0.05, 0.12)
    assert rules.prefill_interference(window([4] * 5, [0] * 5, [0.2] * 5, long_prompts, tpot=narrow)) is None


def test_ttft_split_into_queueing_and_compute():
    q = rules.ttft_is_queueing(window([8] * 5, [4] * 5, [0.2] * 5, ttft=Latency(20, 2.0, 4.0), queue=Latency(20, 1.5, 3.0)))
    assert q.rule == "ttft_is_queueing" and q.severity == "warning"
    c = rules.ttft_is_queueing(window([8] * 5, [0] * 5, [0.2] * 5, ttft=Latency(20, 2.0, 4.0), queue=Latency(20, 0.1, 0.2)))
    assert c.rule == "ttft_is_compute" and c.severity == "info"
    # Long queue times, but nobody waited for a seat or memory: the wait was for slow steps.
    s = rules.ttft_is_queueing(window([8] * 5, [0] * 5, [0.2] * 5, ttft=Latency(20, 2.0, 4.0), queue=Latency(20, 1.5, 3.0)))
    assert s.rule == "ttft_is_compute"
    s = rules.ttft_is_queueing(window([5] * 5, [3] * 5, [0.2] * 5, ttft=Latency(20, 2.0, 4.0), queue=Latency(20, 1.5, 3.0)))
    assert s.rule == "ttft_is_compute"
    s = rules.ttft_is_queueing(window([5] * 5, [3] * 5, [0.9] * 5, ttft=Latency(20, 2.0, 4.0), queue=Latency(20, 1.5, 3.0)))
    assert s.rule == "ttft_is_queueing"  # waiting on memory
    assert rules.ttft_is_queueing(window([8] * 5, [0] * 5, [0.2] * 5, ttft=Latency(20, 0.2, 0.4),
                                         queue=Latency(20, 0.15, 0.2))) is None  # fast enough not to matter


def test_speculation_at_a_large_batch_or_with_few_acceptances():
    spec = {"limits": {"speculative_method": "ngram", "speculative_disable_by_batch_size": 64}}
    drafts = {"vllm:spec_decode_num_draft_tokens": 400, "vllm:spec_decode_num_accepted_tokens": 200}
    busy = rules.speculation_not_paying(window([16] * 5, [0] * 5, [0.2] * 5, drafts, **spec))
    assert busy is not None and busy.fix == f"--speculative-disable-by-batch-size {rules.SPEC_PAYS_UP_TO}"
    assert rules.speculation_not_paying(window([2] * 5, [0] * 5, [0.2] * 5, drafts, **spec)) is None  # pays
    poor = {"vllm:spec_decode_num_draft_tokens": 400, "vllm:spec_decode_num_accepted_tokens": 40}
    assert rules.speculation_not_paying(window([2] * 5, [0] * 5, [0.2] * 5, poor, **spec)).fix == "drop --speculative-method"
    assert rules.speculation_not_paying(window([16] * 5, [0] * 5, [0.2] * 5, drafts)) is None  # no speculation


def test_fleet_rules():
    hot, cold = window([8] * 5, [5] * 5, [0.4] * 5), window([1] * 5, [0] * 5, [0.1] * 5, replica="http://b")
    f = rules.uneven_load([hot, cold])
    assert f.severity == "critical" and "http://a" in f.cause
    assert rules.uneven_load([hot, window([6] * 5, [4] * 5, [0.4] * 5, replica="http://b")]) is None
    idle = [window([1] * 5, [0] * 5, [0.1] * 5, replica=r) for r in ("http://a", "http://b", "http://c")]
    over = rules.over_provisioned(idle)
    assert over.severity == "warning" and over.evidence["replicas_needed"] == 1
    assert rules.over_provisioned(idle[:1]).severity == "info"  # one replica: nothing to scale in
    assert rules.over_provisioned([hot, cold]) is None  # someone waits


def test_diagnose_ranks_critical_first():
    hot, cold = window([8] * 5, [5] * 5, [0.4] * 5), window([1] * 5, [0] * 5, [0.1] * 5, replica="http://b")
    found = rules.diagnose(rules.Evidence([hot, cold]))
    assert [f.severity for f in found] == sorted((f.severity for f in found), key=rules.SEVERITY_RANK.get)
    assert found[0].severity == "critical"


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 10.0), (0.5, 60.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (40 / 50))
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, [(1.0, 0.0), (float("inf"), 5.0)]) == 1.0  # past the last bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_windows_use_growth_within_the_window_and_survive_a_file_round_trip():
    def scrape(at, running, tokens, buckets):
        text = (f'vllm:num_requests_running{{model_name="m"}} {running}\n'
                f'vllm:num_requests_waiting{{model_name="m"}} 0\n'
                f'vllm:kv_cache_usage_perc{{model_name="m"}} 0.5\n'
                '# TYPE vllm:generation_tokens counter\n'
                f'vllm:generation_tokens_total{{model_name="m"}} {tokens}\n'
                '# TYPE vllm:time_to_first_token_seconds histogram\n'
                + "".join(f'vllm:time_to_first_token_seconds_bucket{{le="{le}",model_name="m"}} {c}\n'
                          for le, c in buckets)
                + f'vllm:time_to_first_token_seconds_count{{model_name="m"}} {buckets[-1][1]}\n'
                + 'vllm:time_to_first_token_seconds_sum{model_name="m"} 1.0\n')
        return Scrape(at, parse_exposition(text))

    # Before the window: 100 slow requests; within it: 10 fast ones. Only the 10 count.
    first = scrape(0.0, 2, 1000, [("0.1", 0), ("10.0", 100), ("+Inf", 100)])
    last = scrape(10.0, 4, 1500, [("0.1", 10), ("10.0", 100), ("+Inf", 110)])
    recording = Recording([ReplicaRecording("http://a", [first, last], {"m": LIMITS})])
    for rec in (recording, Recording.from_json(recording.to_json())):
        (w,) = windows(rec)
        assert w.running == [2, 4] and w.rate("vllm:generation_tokens") == 50.0
        assert w.ttft.count == 10 and w.ttft.p50 == pytest.approx(0.05) and w.max_num_seqs == 8


def test_nvidia_smi_csv_and_dcgm_readers():
    csv_text = ("timestamp, index, utilization.gpu [%], power.draw [W], clocks.sm [MHz], clocks.max.sm [MHz], "
                "clocks_event_reasons.active\n"
                "2026/11/30 10:00:00.000, 0, 100 %, 690.10 W, 1410 MHz, 1980 MHz, 0x0000000000000004\n"
                "2026/11/30 10:00:01.000, 0, 98 %, 695.20 W, 1395 MHz, 1980 MHz, 0x0000000000000004\n"
                "2026/11/30 10:00:02.000, 0, 97 %, 400.00 W, 1980 MHz, 1980 MHz, 0x0000000000000000\n")
    g = read_nvidia_smi_csv(csv_text)
    assert g.samples == 3 and g.mean_util == pytest.approx(0.9833, abs=1e-3)
    share, reasons = g.throttled_share()
    assert share == pytest.approx(2 / 3) and reasons == ["software power cap"]
    (throttle,) = [f for f in rules.gpu_findings(g, []) if f.rule == "gpu_throttling"]
    assert "1980" in throttle.cause

    def dcgm(sm, tensor, dram, util):
        return (f'DCGM_FI_PROF_SM_ACTIVE{{gpu="0"}} {sm}\nDCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{gpu="0"}} {tensor}\n'
                f'DCGM_FI_PROF_DRAM_ACTIVE{{gpu="0"}} {dram}\nDCGM_FI_DEV_GPU_UTIL{{gpu="0"}} {util}\n')

    g = read_dcgm_scrapes([dcgm(0.3, 0.05, 0.8, 100), dcgm(0.35, 0.06, 0.75, 99)])
    found = {f.rule for f in rules.gpu_findings(g, [window([4] * 5, [0] * 5, [0.3] * 5)])}
    assert found == {"gpu_utilization_misleads", "host_bound", "memory_bound_decode"}
    busy = read_dcgm_scrapes([dcgm(0.9, 0.7, 0.5, 100)])
    assert rules.gpu_findings(busy, [window([64] * 5, [0] * 5, [0.3] * 5)]) == []


def test_trace_summary_measures_within_the_step_ranges():
    from tokenmill.doctor.trace import summarize

    def ev(name, cat, ts, dur, tid=1):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid}

    events = [ev("tokenmill.step", "user_annotation", 0, 100), ev("tokenmill.step", "user_annotation", 200, 100),
              ev("aten::mm", "cpu_op", 10, 30), ev("aten::addmm", "cpu_op", 15, 10),  # nested: counted once
              ev("aten::mm", "cpu_op", 210, 20), ev("aten::idle_between_steps", "cpu_op", 120, 50)]
    t = summarize({"traceEvents": events})
    assert t.steps == 2 and t.step_us == 200 and t.cpu_op_us == 50 and t.gpu_kernel_us is None
    assert t.top_ops[0] == ("aten::mm", 50)
    cpu = {f.rule for f in rules.trace_findings(t)}
    assert cpu == {"step_time", "host_overhead_trace"}  # 25% of the step in operators

    kernels = [ev("gemm", "kernel", 20, 150, tid=7), ev("gemm", "kernel", 220, 70, tid=7)]
    t = summarize({"traceEvents": events + kernels})
    assert t.gpu_busy_share == (80 + 70) / 200
    assert {f.rule for f in rules.trace_findings(t)} == {"step_time"}  # 75% busy: not host-bound
    assert summarize({"traceEvents": []}).steps == 0 and rules.trace_findings(summarize({"traceEvents": []})) == []


def test_every_flag_a_rule_suggests_exists():
    """A fix names flags; a renamed flag must fail here, not mislead an operator."""
    import re
    from pathlib import Path

    from tokenmill.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    known = {opt for name in ("serve", "router") for a in commands[name]._actions for opt in a.option_strings}
    suggested = set(re.findall(r"--[a-z][a-z-]+", Path(rules.__file__).read_text()))
    assert suggested and suggested <= known, suggested - known
