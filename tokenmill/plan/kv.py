"""The scheduler a simulated replica runs: the engine core's own, over the engine's own KV cache
manager, built from the same settings (directly rather than through Scheduler.from_config only
to skip building a 100,000-block pool twice)."""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.scheduler import Scheduler


def simulated_scheduler(config: EngineConfig, num_blocks: int, max_model_len: int) -> Scheduler:
    kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
    return Scheduler(
        kv, config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens, max_model_len,
        config.speculative.num_lookahead_tokens, config.speculative.speculative_disable_by_batch_size,
    )
