"""plan.kv's incremental manager is a speed-up only: over a trace with preemptions and prefix
hits, the simulator schedules exactly as it does on the engine's own KVCacheManager."""

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.scheduler import Scheduler
from tokenmill.plan import simulator
from tokenmill.plan.cost import ConstantCost
from tokenmill.plan.workload import synthetic


@pytest.mark.parametrize("seed", [5, 6])
def test_incremental_manager_schedules_like_the_engines(monkeypatch, seed):
    config = EngineConfig.from_flat(num_kv_blocks=60, max_num_seqs=8, max_num_batched_tokens=64)
    trace = synthetic(60, rate=3, input_len=100, output_len=40, range_ratio=0.6, prefix_len=48, seed=seed)

    def run():
        return simulator.Simulator(config, 60, 4096, ConstantCost(0.1), 49152, log_steps=True).run(trace)

    fast = run()
    monkeypatch.setattr(simulator, "simulated_scheduler", Scheduler.from_config)
    engine_kv = run()
    assert fast.num_preemptions > 0 and fast.prefix_hit_rate > 0
    assert fast.steps == engine_kv.steps
    assert [r.output_tokens for r in fast.records] == [r.output_tokens for r in engine_kv.records]
    assert fast.replicas[0].scheduler.kv.prefix_hits == engine_kv.replicas[0].scheduler.kv.prefix_hits
