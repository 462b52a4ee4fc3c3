"""The engine's KVCacheManager, with one method made incremental for fleet-sized runs.

KVCacheManager._cache_full_blocks walks every full block of a request on every
allocate_slots call, so a decode step costs O(context / block_size) per running request:
60% of a simulation's time at 1,000-token contexts (cProfile). This subclass remembers, per
request, the leading run of blocks already keyed with the request's own hashes and starts
the walk after it. The result is the same: a block keyed while its request holds it stays
keyed (it is not in the free queue, so it cannot be evicted, and the prefix cache cannot be
reset while a block is in use), so calling cache_block on it again is a no-op. The step-log
equality test against the real engine (tests/plan/test_engine_equivalence.py) runs on it.
The same change would speed up the engine itself; it belongs in kv_cache.py when its owner
agrees.
"""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler


class IncrementalKVCacheManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_caching)
        self._keyed: dict[Request, int] = {}  # leading blocks keyed with the request's own hashes

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        self._update_hashes(request)
        hashes, ids, blocks = request.block_hashes, request.block_ids, self.pool.blocks
        end = min(num_tokens // self.block_size, len(hashes))
        start = self._keyed.get(request, 0)
        for i in range(start, end):
            self.pool.cache_block(ids[i], hashes[i])
        while start < end and blocks[ids[start]].block_hash == hashes[start]:
            start += 1
        self._keyed[request] = start

    def free(self, request: Request) -> None:
        self._keyed.pop(request, None)
        super().free(request)


def simulated_scheduler(config: EngineConfig, num_blocks: int, max_model_len: int) -> Scheduler:
    """The engine core's scheduler, with Scheduler.from_config's arguments, over the incremental
    manager (built directly: a pool of 100,000 blocks takes a second to build twice)."""
    kv = IncrementalKVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
    return Scheduler(
        kv, config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens, max_model_len,
        config.speculative.num_lookahead_tokens, config.speculative.speculative_disable_by_batch_size,
    )
