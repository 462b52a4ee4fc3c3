"""The simulator's scheduling is the engine's: with every step charged the same time, its
batches, preemptions and prefix hits equal the real engine's (smollm2 on CPU) step for step.

The trace is built to exercise all three: a pool of 10 blocks (tests/plan/conftest.py) forces preemptions, a 32-token
prefix shared by half the requests gives prefix hits, a 48-token budget chunks the prompts,
and requests keep arriving while others run."""

import pytest

from tokenmill.config import EngineConfig
from tokenmill.plan.cost import ConstantCost
from tokenmill.plan.simulator import Simulator
from tokenmill.plan.workload import TraceRequest, prompt_ids
from tokenmill.sampling import SamplingParams

# (step before which it arrives, prompt length, output length, shared prefix length)
ARRIVALS = [(0, 40, 30, 32), (0, 50, 24, 32), (0, 20, 40, 0), (3, 45, 30, 32), (5, 35, 28, 0),
            (6, 60, 20, 32), (9, 33, 35, 32), (14, 25, 30, 0), (20, 70, 16, 32), (21, 41, 26, 0)]


def _trace() -> list[TraceRequest]:
    # Step k (k >= 1) starts at time k with a one-second step: arriving at k - 0.5 puts a
    # request in the queue during step k - 1, as adding it before the k-th engine.step() does.
    return [TraceRequest(max(0.0, k - 0.5), n_in, n_out, prefix) for k, n_in, n_out, prefix in ARRIVALS]


def _logging_schedule(scheduler, log):
    schedule = scheduler.schedule

    def wrapped():
        out = schedule()
        if not out.is_empty:
            log.append({
                "chunks": [(c.request.request_id, c.start, c.num_tokens, c.new) for c in out.chunks],
                "preempted": [r.request_id for r in out.preempted],
            })
        return out

    return wrapped


@pytest.mark.slow
def test_simulated_steps_equal_the_engines(small_engine, engine_settings):
    trace = _trace()
    engine = small_engine
    vocab = engine.vocab_size
    real: list[dict] = []
    engine.core.scheduler.schedule = _logging_schedule(engine.core.scheduler, real)
    k = 0
    while k <= ARRIVALS[-1][0] or engine.has_unfinished:
        for i, (step, *_rest) in enumerate(ARRIVALS):
            if step == k:
                tr = trace[i]
                engine.add_request(f"req-{i}", prompt_ids(i, tr, vocab),
                                   SamplingParams(max_tokens=tr.output_len, ignore_eos=True, temperature=0.0))
        engine.step()
        k += 1
    assert engine.kv.num_free_blocks == engine.kv.num_blocks

    config = EngineConfig.from_flat(**engine_settings)
    sim = Simulator(config, engine.kv.num_blocks, engine.max_model_len, ConstantCost(1.0), vocab, log_steps=True)
    result = sim.run(trace)

    assert engine.scheduler.num_preemptions > 0 and engine.kv.prefix_hits > 0  # the trace does its job
    assert len(result.steps) == len(real)
    for i, (sim_step, real_step) in enumerate(zip([{k: v for k, v in s.items() if k != "replica"} for s in result.steps], real)):
        assert sim_step == real_step, f"step {i} differs"
    kv = result.replicas[0].scheduler.kv
    assert result.num_preemptions == engine.scheduler.num_preemptions
    assert (kv.prefix_queries, kv.prefix_hits) == (engine.kv.prefix_queries, engine.kv.prefix_hits)
    assert kv.num_free_blocks == kv.num_blocks
    # Every request got all its tokens, one per sampling step, as the engine gave them.
    assert [r.output_tokens for r in result.records] == [n_out for _, _, n_out, _ in ARRIVALS]
