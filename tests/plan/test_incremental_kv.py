"""The KV manager keys full blocks incrementally (from the first block not yet keyed with the
request's own hash). That is a speed-up only: over a trace with preemptions and prefix hits, the
scheduler does exactly what it does with a manager that walks every block every step."""

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.plan import simulator
from tokenmill.plan.cost import ConstantCost
from tokenmill.plan.workload import synthetic


class FullWalkKVCacheManager(KVCacheManager):
    """The reference: every full block of the request keyed again on every allocation."""

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        self._update_hashes(request)
        for i in range(min(num_tokens // self.block_size, len(request.block_hashes))):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])


def full_walk_scheduler(config: EngineConfig, num_blocks: int, max_model_len: int) -> Scheduler:
    kv = FullWalkKVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
    return Scheduler(kv, config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens, max_model_len)


@pytest.mark.parametrize("seed", [5, 6])
def test_incremental_keying_schedules_like_the_full_walk(monkeypatch, seed):
    config = EngineConfig.from_flat(num_kv_blocks=60, max_num_seqs=8, max_num_batched_tokens=64)
    trace = synthetic(60, rate=3, input_len=100, output_len=40, range_ratio=0.6, prefix_len=48, seed=seed)

    def run():
        return simulator.Simulator(config, 60, 4096, ConstantCost(0.1), 49152, log_steps=True).run(trace)

    fast = run()
    monkeypatch.setattr(simulator, "simulated_scheduler", full_walk_scheduler)
    reference = run()
    assert fast.num_preemptions > 0 and fast.prefix_hit_rate > 0
    assert fast.steps == reference.steps
    assert [r.output_tokens for r in fast.records] == [r.output_tokens for r in reference.records]
    assert fast.replicas[0].scheduler.kv.prefix_hits == reference.replicas[0].scheduler.kv.prefix_hits
