"""The cost model's roofline behaves like one, and the simulator's fleet mechanics hold:
every request completes, every block comes back, a concurrency limit is a limit."""

import json

import pytest

from tokenmill.config import EngineConfig
from tokenmill.plan.catalog import hardware, model_shape
from tokenmill.plan.cost import CostModel, Profile, SeqShape
from tokenmill.plan.replica import ReplicaSpec
from tokenmill.plan.search import max_rate
from tokenmill.plan.workload import synthetic

LLAMA8B, H100 = model_shape("llama-3.1-8b"), hardware("H100")


def _model(tp=1, hw=H100):
    return CostModel(LLAMA8B, hw, Profile(hw.name, "bf16"), tp)


def test_batch1_decode_is_memory_bound_and_long_prefill_compute_bound():
    m = _model()
    decode = m.cost([SeqShape(1000, 1, True, False)])
    assert decode.bound == "memory"
    # One decode step streams the 16 GB of weights: at least weights / peak bandwidth.
    assert decode.seconds > 16.06e9 / H100.bandwidth
    prefill = m.cost([SeqShape(0, 4096, True, True)])
    assert prefill.bound == "compute"
    # Batching decode rows is nearly free while memory-bound: 64 rows cost far less than 64 steps.
    batch = m.step_seconds([SeqShape(1000, 1, True, False)] * 64)
    assert batch < 3 * decode.seconds


def test_tensor_parallel_splits_work_and_pays_for_the_link():
    one, two = _model(1).cost([SeqShape(0, 4096, True, True)]), _model(2).cost([SeqShape(0, 4096, True, True)])
    assert two.comm_s > 0 == one.comm_s
    assert two.compute_s == pytest.approx(one.compute_s / 2)
    slow_link = _model(2, hardware("L40S")).cost([SeqShape(0, 4096, True, True)])
    assert slow_link.comm_s > two.comm_s


def test_moe_decode_reads_only_chosen_experts():
    moe = CostModel(model_shape("mixtral-8x7b"), H100, Profile("H100", "bf16"))
    assert moe.weight_bytes_read(1) < 0.4 * moe.weight_bytes_read(10_000)


def _spec(seqs=32, hw="H100", **cache):
    config = EngineConfig.from_flat(max_num_seqs=seqs, max_num_batched_tokens=2048, **cache)
    return ReplicaSpec(LLAMA8B, hardware(hw), 1, Profile(hw, "bf16"), config)


def test_fleet_run_completes_everything_and_frees_every_block():
    trace = synthetic(300, rate=40, input_len=300, output_len=40, range_ratio=0.5, prefix_len=64)
    res = _spec().simulator(num_replicas=4, policy="prefix").run(trace)
    assert res.metrics.completed == 300 and res.metrics.failed == 0
    assert [r.output_tokens for r in res.records] == [t.output_len for t in trace]
    for replica in res.replicas:
        kv = replica.scheduler.kv
        assert kv.num_free_blocks == kv.num_blocks
        assert replica.num_steps > 0  # the router spread the load
    assert res.prefix_hit_rate > 0.1  # a 64-token prefix of ~360 tokens is shared


def test_small_pool_preempts_and_still_completes():
    trace = synthetic(40, input_len=200, output_len=100)
    res = _spec(num_kv_blocks=40).simulator().run(trace)
    assert res.num_preemptions > 0 and res.metrics.completed == 40


def test_concurrency_limit_and_think_time():
    trace = synthetic(60, input_len=100, output_len=20)
    res = _spec(seqs=64).simulator(max_concurrency=5, think_time_s=0.5).run(trace)
    assert res.metrics.completed == 60
    assert max(p.running + p.waiting for p in res.timeline) <= 5
    # With users resting 0.5 s between answers, 60 requests over 5 users take >= 11 rests.
    assert res.duration > 11 * 0.5 * 0.5


def test_faster_hardware_sustains_more_rate():
    slos = {"ttft": 500.0}
    trace_at = lambda rate: synthetic(60, rate=rate, input_len=500, output_len=30, seed=1)  # noqa: E731
    a100 = max_rate(_spec(hw="A100"), trace_at, slos, start=8.0, iterations=3)
    h200 = max_rate(_spec(hw="H200"), trace_at, slos, start=8.0, iterations=3)
    assert 0 < a100.max_rate < h200.max_rate


def test_cli_simulate_writes_a_bench_shaped_result(tmp_path):
    from tokenmill.cli import main

    out = tmp_path / "sim.json"
    assert main(["plan", "simulate", "--hardware", "H100", "--model", "llama-3.1-8b", "--num-prompts", "50",
                 "--request-rate", "5", "--random-input-len", "200", "--random-output-len", "20",
                 "--result-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 50 and result["median_ttft_ms"] > 0 and len(result["ttfts"]) == 50


def test_replay_of_a_bench_result(tmp_path):
    from tokenmill.plan.workload import from_bench_result

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"input_lens": [100, 200, 50], "output_lens": [10, 0, 30], "start_times": [0.0, 0.5, 1.5]}))
    trace = from_bench_result(path, prefix_len=32)
    # The failed request (0 output tokens) has no length to replay.
    assert [(t.arrival, t.input_len, t.output_len, t.prefix_len) for t in trace] == [(0.0, 100, 10, 32), (1.5, 50, 30, 32)]
    res = _spec().simulator().run(trace)
    assert res.metrics.completed == 2 and res.records[1].start_time == 1.5
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bench result"):
        from_bench_result(tmp_path / "bad.json")


def test_an_arrival_lengthens_the_step_it_lands_in():
    # Steps of 10 ms; B lands in A's second step (10-20 ms), which then ends at 23 ms, and B's
    # prefill step runs 23-33 ms. An arrival on an idle replica lengthens nothing (A's first step).
    from tokenmill.plan.cost import ConstantCost
    from tokenmill.plan.simulator import Simulator
    from tokenmill.plan.workload import TraceRequest

    cost = ConstantCost(0.01)
    cost.arrival_s = 0.003
    config = EngineConfig.from_flat(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=256)
    res = Simulator(config, 64, 2048, cost, 1000).run([TraceRequest(0.0, 16, 8), TraceRequest(0.015, 16, 2)])
    a, b = res.records
    assert a.ttft == pytest.approx(0.01)
    assert a.itl[0] == pytest.approx(0.013)  # its second token's step was lengthened
    assert b.ttft == pytest.approx(0.033 - 0.015)
    assert res.replicas[0].busy_seconds == pytest.approx(a.latency)  # busy throughout: 8 steps + 3 ms


def test_rows_left_over_from_the_kernels_blocks_cost_extra():
    # Rows computed 4 at a time: 8 decode rows leave none over, 7 leave 3, 9 leave 1.
    plain = CostModel(LLAMA8B, H100, Profile("H100", "bf16"))
    blocked = CostModel(LLAMA8B, H100, Profile("H100", "bf16", row_block=4, per_leftover_row_s=0.002))
    for n, left in ((8, 0), (7, 3), (9, 1)):
        rows = [SeqShape(500, 1, True, False)] * n
        assert blocked.step_seconds(rows) - plain.step_seconds(rows) == pytest.approx(0.002 * left, abs=1e-12)
    # All the step's rows count, prompt rows too: one matmul runs them together.
    mixed = [SeqShape(0, 30, True, True), SeqShape(500, 1, True, False)]
    assert blocked.step_seconds(mixed) - plain.step_seconds(mixed) == pytest.approx(0.002 * 3, abs=1e-12)


def test_the_front_delays_the_way_in_and_out():
    # A request reaches the scheduler ingress_s after its send and the client has each token
    # egress_s after its step; a closed-loop client sends its next request only then.
    from tokenmill.plan.cost import ConstantCost
    from tokenmill.plan.simulator import Simulator
    from tokenmill.plan.workload import TraceRequest

    cost = ConstantCost(0.01)
    cost.ingress_s, cost.egress_s = 0.004, 0.002
    config = EngineConfig.from_flat(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=256)
    res = Simulator(config, 64, 2048, cost, 1000, max_concurrency=1).run([TraceRequest(0.0, 16, 3)] * 2)
    a, b = res.records
    assert a.ttft == pytest.approx(0.004 + 0.01 + 0.002) and a.itl == pytest.approx([0.01, 0.01])
    assert a.latency == pytest.approx(0.004 + 0.03 + 0.002)
    assert b.start_time == pytest.approx(a.latency) and b.ttft == pytest.approx(a.ttft)
