"""The bench client end to end against a scripted fake OpenAI server (tests/bench/fake_openai.py):
measured TTFT/TPOT land on the script, failures are counted and reported, the sweep stops at
the right load, and the CLI writes vLLM-named JSON and the plots."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from tests.bench.fake_openai import FakeServer, Script
from tokenmill.bench.cli import add_bench_arguments, run_bench
from tokenmill.bench.client import RequestSettings
from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.metrics import compute_metrics, fill_output_tokens
from tokenmill.bench.report import records_from_result
from tokenmill.bench.runner import LoadShape, run_load
from tokenmill.bench.sweep import SweepSpec, run_sweep

# Event-loop jitter on a loaded 2-core box (other jobs running) reaches ~10 ms; the script is 20-60 ms.
TOL_MS = 15.0


def samples(n, out=8):
    return [SampleRequest(f"t{i} t2 t3", 3, out) for i in range(n)]


def run(server, backend="completions", n=4, out=8, shape=None, warmups=0, **kw):
    shape = shape or LoadShape(max_concurrency=2)
    settings = RequestSettings(server.base_url, "fake-model", backend, **kw)
    result = asyncio.run(run_load(settings, samples(n, out), shape, num_warmups=warmups))
    fill_output_tokens(result.records, lambda t: len(t.split()))
    return result, compute_metrics(result.records, result.duration)


@pytest.mark.parametrize("backend", ["completions", "chat"])
def test_measured_ttft_and_tpot_match_the_script(backend):
    with FakeServer(Script(ttft_s=0.06, itl_s=0.02)) as server:
        # Warm-ups, one per connection, as `tokenmill bench --num-warmups` sends: the first
        # request of a process pays one-time costs (lazy imports in httpx/anyio/starlette,
        # connection set-up) measured at 30-300 ms on a cold CI machine, which are not the
        # script's TTFT. The measured four then show only the client's own accuracy.
        result, m = run(server, backend, n=4, out=8, warmups=2, ignore_eos=True)
        body = server.script.bodies[-1]
    assert len(result.warmup_records) == 2 and all(r.success for r in result.warmup_records)
    assert m.completed == 4 and m.failed == 0
    assert m.total_output == 32
    assert m.ttft.median == pytest.approx(60.0, abs=TOL_MS)  # role-only chat chunk is not a token
    assert m.tpot.median == pytest.approx(20.0, abs=5.0)
    assert m.itl.median == pytest.approx(20.0, abs=5.0)
    assert m.e2el.median == pytest.approx(60 + 7 * 20, abs=2 * TOL_MS)
    assert all(len(r.itl) == 7 for r in result.records)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True
    assert ("messages" in body) == (backend == "chat")


def test_without_usage_output_is_recounted():
    with FakeServer(Script(ttft_s=0.01, itl_s=0.005, send_usage=False)) as server:
        result, _ = run(server, n=2, out=5)
    assert [r.output_tokens for r in result.records] == [5, 5]


def test_server_errors_are_failures_not_crashes():
    script = Script(ttft_s=0.01, itl_s=0.005, fail_http={1}, drop_stream={2}, error_event={3})
    with FakeServer(script) as server:
        result, m = run(server, n=6, out=6, shape=LoadShape(max_concurrency=1))
    assert (m.completed, m.failed) == (3, 3)
    errors = [r.error for r in result.records]
    assert errors[0] == "" and errors[1].startswith("HTTP 500")
    assert errors[2] and errors[3].startswith("error event")
    assert m.total_output == 18  # failed requests add no tokens


def test_connection_refused_is_a_failure():
    settings = RequestSettings("http://127.0.0.1:9", "m")  # discard port: nothing listens
    result = asyncio.run(run_load(settings, samples(2), LoadShape(), request_timeout=5))
    assert all(not r.success and r.error for r in result.records)


def test_request_rate_spaces_the_sends():
    # Sends follow absolute offsets, so one late wake-up (the GIL, a loaded CI box) shortens the
    # next gap rather than shifting the rest: the median gap and the span are the robust measures.
    with FakeServer(Script(ttft_s=0.005, itl_s=0.001)) as server:
        result, _ = run(server, n=5, out=2, shape=LoadShape(request_rate=10.0, burstiness=math.inf))
    starts = sorted(r.start_time for r in result.records)
    gaps = sorted(b - a for a, b in zip(starts, starts[1:]))
    assert (gaps[1] + gaps[2]) / 2 == pytest.approx(0.1, abs=0.03)
    assert starts[-1] - starts[0] == pytest.approx(0.4, abs=0.08)  # a burst would span ~0


def test_sweep_stops_at_the_highest_concurrency_meeting_the_slo():
    # TTFT = 20 ms per request in flight: concurrency 1 -> ~20 ms, 2 -> ~40, 4 -> ~80.
    script = Script(ttft_s=0.0, itl_s=0.002, ttft_per_inflight_s=0.02)
    with FakeServer(script) as server:
        settings = RequestSettings(server.base_url, "fake-model")

        async def point(shape):
            r = await run_load(settings, samples(8, out=3), shape)
            fill_output_tokens(r.records, None)
            return r, compute_metrics(r.records, r.duration)

        sweep = asyncio.run(run_sweep(SweepSpec.parse("concurrency:4,1,2,8"), LoadShape(), {"ttft": 60.0}, point))
    assert [p.value for p in sweep.points] == [1, 2, 4]  # stopped after the first miss
    assert [p.meets_slo for p in sweep.points] == [True, True, False]
    assert sweep.best.value == 2 and sweep.stopped_early


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(argv)


def test_cli_writes_vllm_result_json_and_plots(tmp_path, toy_tokenizer_json):
    pytest.importorskip("matplotlib")
    with FakeServer(Script(ttft_s=0.01, itl_s=0.004, fail_http={2})) as server:
        args = _args(["--base-url", server.base_url, "--tokenizer", toy_tokenizer_json, "--num-prompts", "6",
                      "--random-input-len", "12", "--random-output-len", "5", "--max-concurrency", "3",
                      "--num-warmups", "2", "--goodput", "ttft:1000", "--percentiles", "50,99.9",
                      "--result-json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "plots"), "--no-progress"])
        before = time.time()
        assert run_bench(args) == 0
        after = time.time()
        assert server.script.seen == 8  # 2 warm-ups + 6 measured
        assert server.script.bodies[0]["model"] == "fake-model"  # discovered from /v1/models
    res = json.loads((tmp_path / "r.json").read_text())
    # The server numbers requests from the warm-ups on: #2 is the first measured one.
    assert res["completed"] + res["failed"] == 6 and res["failed"] == 1
    for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
                "input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors",
                "max_output_tokens_per_s", "max_concurrent_requests", "model_id", "num_prompts",
                "request_rate", "burstiness", "max_concurrency",
                "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p50_ttft_ms", "p99.9_ttft_ms",
                "mean_tpot_ms", "p99.9_tpot_ms", "mean_itl_ms", "p50_itl_ms", "mean_e2el_ms", "p99.9_e2el_ms"):
        assert key in res, key
    assert res["request_rate"] == "inf" and res["max_concurrency"] == 3
    # The first measured send's wall-clock time (after the warm-ups), to line up with a step log.
    assert before < res["start_unix"] < after - max(res["e2els"])
    assert len(res["itls"]) == 6 and res["output_lens"].count(5) == 5
    assert all(n == 12 for n in res["input_lens"])
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 10_000
    back = records_from_result(res)  # the JSON alone is enough to redraw the plots
    assert [r.success for r in back].count(False) == 1 and back[1].itl == res["itls"][1]


def test_cli_sweep_json_and_plots(tmp_path, toy_tokenizer_json):
    pytest.importorskip("matplotlib")
    with FakeServer(Script(ttft_s=0.005, itl_s=0.002)) as server:
        args = _args(["--base-url", server.base_url, "--model", "fake-model", "--tokenizer", toy_tokenizer_json,
                      "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
                      "--sweep", "rate:50,100", "--goodput", "ttft:2000", "--backend", "chat",
                      "--result-json", str(tmp_path / "s.json"), "--plot", str(tmp_path), "--no-progress"])
        assert run_bench(args) == 0
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["sweep"]["kind"] == "rate" and res["sweep"]["best"] == 100.0
    assert [r["request_rate"] for r in res["runs"]] == [50.0, 100.0]
    for name in ("latency_cdf.png", "sweep_throughput.png", "sweep_latency.png"):
        assert (tmp_path / name).is_file()


def test_cli_rejects_bad_flags(toy_tokenizer_json):
    assert run_bench(_args(["--goodput", "foo:1", "--model", "m", "--tokenizer", toy_tokenizer_json])) == 2
    assert run_bench(_args(["--sweep", "rate:", "--model", "m", "--tokenizer", toy_tokenizer_json])) == 2
