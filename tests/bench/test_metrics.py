"""Metric arithmetic on hand-made timelines, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.bench.metrics import compute_metrics, fill_output_tokens, parse_goodput, percentile_key
from tokenmill.bench.records import RequestRecord


def rec(start, ttft, itl, out, prompt=10, ok=True, text="") -> RequestRecord:
    latency = ttft + sum(itl)
    return RequestRecord(prompt_len=prompt, expected_output_len=out, start_time=start, ttft=ttft, itl=list(itl),
                         latency=latency, output_tokens=out if ok else None, generated_text=text,
                         success=ok, error="" if ok else "HTTP 500")


def test_tpot_and_e2e_of_one_request():
    r = rec(0.0, 0.5, [0.1, 0.1, 0.2], out=4)
    assert r.latency == pytest.approx(0.9)
    assert r.tpot == pytest.approx((0.9 - 0.5) / 3)
    assert r.token_times == pytest.approx([0.5, 0.6, 0.7, 0.9])
    assert rec(0.0, 0.5, [], out=1).tpot is None  # one token: TPOT undefined


def test_tpot_uses_token_count_not_chunk_count():
    # 3 chunks carrying 7 tokens (a server batching tokens per chunk): TPOT divides by 6.
    r = rec(0.0, 0.2, [0.3, 0.3], out=7)
    assert r.tpot == pytest.approx(0.6 / 6)


def test_summary_over_mixed_records():
    records = [
        rec(0.0, 0.1, [0.05, 0.05], out=3, prompt=100),
        rec(0.5, 0.3, [0.1], out=2, prompt=50),
        rec(1.0, 0.2, [], out=1, prompt=20),
        rec(1.0, 0.0, [], out=0, prompt=999, ok=False),
    ]
    m = compute_metrics(records, duration=2.0, percentiles=[50, 90, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input == 170  # failed prompts do not count
    assert m.total_output == 6
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.0)
    assert m.total_token_throughput == pytest.approx(88.0)
    assert m.request_goodput is None
    assert m.ttft.mean == pytest.approx(200.0)
    assert m.ttft.median == pytest.approx(200.0)
    assert m.ttft.std == pytest.approx(np.std([100, 300, 200]))
    # TPOT over requests with > 1 token: 0.1/2 = 50 ms and 0.1/1 = 100 ms.
    assert m.tpot.count == 2 and m.tpot.mean == pytest.approx(75.0)
    # ITL pools every gap: 50, 50, 100.
    assert m.itl.mean == pytest.approx(200 / 3) and m.itl.median == pytest.approx(50.0)
    assert m.e2el.percentiles[50.0] == pytest.approx(200.0)
    # Linear interpolation between order statistics, as numpy (and vLLM) compute them.
    assert m.e2el.percentiles[90.0] == pytest.approx(np.percentile([200, 400, 200], 90))
    assert m.e2el.percentiles[99.0] == pytest.approx(396.0)


def test_goodput_counts_requests_meeting_every_slo():
    records = [
        rec(0.0, 0.1, [0.02] * 9, out=10),   # ttft 100, tpot 20, e2e 280
        rec(0.0, 0.4, [0.02] * 9, out=10),   # ttft 400: misses ttft
        rec(0.0, 0.1, [0.06] * 9, out=10),   # tpot 60: misses tpot
        rec(0.0, 0.25, [], out=1),           # one token: tpot counts as 0, e2e 250
    ]
    slos = parse_goodput(["ttft:300", "tpot:50"])
    m = compute_metrics(records, duration=2.0, goodput_slos=slos)
    assert m.good_completed == 2
    assert m.request_goodput == pytest.approx(1.0)
    # E2E: 280, 580, 640, 250 ms -> only the one-token request is within 260 ms.
    m = compute_metrics(records, duration=2.0, goodput_slos=parse_goodput(["e2el:260"]))
    assert m.good_completed == 1
    assert m.meets({"ttft": 500.0}) and not m.meets({"ttft": 150.0})


def test_goodput_parsing_rejects_nonsense():
    assert parse_goodput(["TTFT:1.5", "e2el:10"]) == {"ttft": 1.5, "e2el": 10.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["tpot:-1"], ["ttft:nan"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_empty_run_reports_zeros_not_nan():
    m = compute_metrics([rec(0, 0, [], 0, ok=False)], duration=1.0)
    assert m.completed == 0 and m.failed == 1
    assert m.ttft.mean == 0.0 and not math.isnan(m.tpot.std)
    assert not m.meets({"ttft": 1e9})


def test_output_tokens_recounted_when_server_sends_no_usage():
    r = rec(0.0, 0.1, [0.1], out=2, text="a b c d")
    r.output_tokens = None
    fill_output_tokens([r], lambda text: len(text.split()))
    assert r.output_tokens == 4
    r.output_tokens = None
    fill_output_tokens([r], None)  # no tokenizer: one token per chunk
    assert r.output_tokens == 2


def test_peak_output_rate_buckets_by_second():
    records = [rec(0.0, 0.1, [0.1] * 5, out=6), rec(0.2, 0.1, [0.1] * 5, out=6), rec(1.5, 0.1, [0.1], out=2)]
    m = compute_metrics(records, duration=2.0)
    assert m.max_output_tokens_per_s == 12.0
    assert m.max_concurrent_requests == 2


def test_percentile_keys_match_vllm():
    assert percentile_key(99) == "p99" and percentile_key(99.9) == "p99.9" and percentile_key(50.0) == "p50"
