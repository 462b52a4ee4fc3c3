"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference counts and a
prefix cache keyed by chained block hashes. Pure Python: no torch, no clock.

A block that no request uses goes to the free queue but keeps its hash, so a later request
with the same prefix can take it back (a prefix-cache hit). The free queue is LRU order:
allocation evicts from its front. A request frees its blocks tail-first, so within one
chain the leaves are evicted before the blocks they depend on.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from tokenmill.engine.request import Request

# 128 bits of SHA-256 over (parent digest, token ids): a collision needs ~2^64 distinct blocks
# (birthday bound), far beyond any cache's lifetime, so a hit is treated as exact. Python's
# built-in 64-bit hash() is not used: it is cheap to collide on purpose.
_DIGEST_BYTES = 16
_ROOT = b"tokenmill-kv-v1"


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.sha256(parent or _ROOT)
    h.update(array("q", token_ids).tobytes())
    return h.digest()[:_DIGEST_BYTES]


@dataclass(slots=True)  # millions of them in a planner fleet: no per-block __dict__
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def allocate(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_cnt == 0
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1
        block.ref_cnt = 1
        return block_id

    def touch(self, block_id: int) -> None:
        """Take a reference on a cached block (removing it from the free queue if idle)."""
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free_queue[block_id]
        block.ref_cnt += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt <= 0:
            raise RuntimeError(f"double free of KV block {block_id}")
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            if block.block_hash is None:
                # Nothing to reuse: hand it out before any cached block.
                self.free_queue[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)
            else:
                self.free_queue[block_id] = None

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        if not self.enable_caching or block_hash in self.cached:
            return  # another request computed the same block first; that one stays canonical
        block = self.blocks[block_id]
        if block.block_hash is None:
            block.block_hash = block_hash
            self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; only possible when no block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True

    def check_invariants(self) -> None:
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in self.free_queue), block
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) == block.block_id, block
        assert len(self.cached) == sum(b.block_hash is not None for b in self.blocks)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which were found
        # With caching off, what it would have found: the leading blocks of each admitted
        # request that a recent request (within a pool's worth of blocks) also started with.
        # Tells an operator (tokenmill doctor) that turning caching on would pay.
        self.missed_prefix_hits = 0
        self._recent: OrderedDict[bytes, None] = OrderedDict()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    # Read-only facts about the pool, for tests and metrics: callers need not know its layout.
    @property
    def num_cached_blocks(self) -> int:
        """Blocks keyed in the prefix cache, in use or idle."""
        return len(self.pool.cached)

    @property
    def num_evictions(self) -> int:
        return self.pool.num_evictions

    def ref_count(self, block_id: int) -> int:
        return self.pool.blocks[block_id].ref_cnt

    def cached_block(self, block_hash: bytes) -> int | None:
        """The block keyed by block_hash, or None if that prefix is not cached."""
        return self.pool.lookup(block_hash)

    def eviction_order(self) -> list[int]:
        """Idle cached blocks, in the order allocation would evict them (never-cached free
        blocks are handed out before any of these)."""
        return [b for b in self.pool.free_queue if self.pool.blocks[b].block_hash is not None]

    def check_invariants(self) -> None:
        self.pool.check_invariants()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, request: Request) -> None:
        hashes = request.block_hashes
        bs = self.block_size
        start = len(hashes)
        full = (len(request.prompt_token_ids) + len(request.output_token_ids)) // bs
        if start >= full:
            return  # the common case while decoding: no block filled since the last call
        # hash_block's chain, with the new blocks' tokens packed once rather than per block
        # (sha256(a) then update(b) is sha256(a + b)).
        data = array("q", request.tokens_slice(start * bs, full * bs)).tobytes()
        width = 8 * bs
        parent = hashes[-1] if hashes else _ROOT
        sha256 = hashlib.sha256
        for k in range(full - start):
            parent = sha256(parent + data[k * width:(k + 1) * width]).digest()[:_DIGEST_BYTES]
            hashes.append(parent)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks at the start of the request's tokens.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_caching:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def record_lookup(self, request: Request, num_hit: int) -> None:
        """Count a lookup once, when its request is admitted (a refused admission retries)."""
        if self.enable_caching:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_hit
            return
        self._update_hashes(request)
        usable = request.block_hashes[: (request.num_tokens - 1) // self.block_size]
        found = next((i for i, h in enumerate(usable) if h not in self._recent), len(usable))
        self.missed_prefix_hits += found * self.block_size
        for h in request.block_hashes:
            self._recent[h] = None
            self._recent.move_to_end(h)
        while len(self._recent) > self.num_blocks:
            self._recent.popitem(last=False)

    def can_allocate(self, request: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        held = len(request.block_ids) + len(computed_blocks)
        need = self.blocks_for(request.num_computed_tokens + num_new_tokens) - held
        # Cached-but-idle blocks we are about to take back are counted in the free queue too.
        reclaimed = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        return need <= self.pool.num_free_blocks - reclaimed

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Make room for num_new_tokens more tokens of KV; False (and no change) if the pool can't.

        computed_blocks (prefix-cache hits) are attached first; request.num_computed_tokens must
        already count them.
        """
        total = request.num_computed_tokens + num_new_tokens
        ids, pool = request.block_ids, self.pool
        if computed_blocks:
            if not self.can_allocate(request, num_new_tokens, computed_blocks):
                return False
            for block_id in computed_blocks:
                pool.touch(block_id)
            ids.extend(computed_blocks)
        # can_allocate without hits, inline: this runs for every request every step.
        need = -(-total // self.block_size) - len(ids)
        if need > 0:
            if need > len(pool.free_queue):
                return False  # (with hits, can_allocate above already ruled this out)
            allocate = pool.allocate
            for _ in range(need):
                ids.append(allocate())
        if self.enable_caching:
            self._cache_full_blocks(request, total)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        # The tokens of every scheduled position are known now, so their blocks can be keyed
        # before the forward pass fills them (the step runs before anyone else can hit them).
        # Incremental: a block keyed with the request's own hash stays keyed while the request
        # holds it (held blocks are never evicted; the cache is never reset with blocks in use),
        # so the walk starts after that leading run instead of at block 0 every step.
        if num_tokens // self.block_size <= request.num_keyed_blocks:
            return  # no block newly full (every decode step but one in block_size): nothing to hash or key
        self._update_hashes(request)
        hashes, ids, pool = request.block_hashes, request.block_ids, self.pool
        end = min(num_tokens // self.block_size, len(hashes))
        start = request.num_keyed_blocks
        if start >= end:
            return
        blocks = pool.blocks
        leading = True  # still inside the leading run of blocks keyed with their own hashes
        for i in range(start, end):
            block_hash, block = hashes[i], blocks[ids[i]]
            pool.cache_block(block.block_id, block_hash)
            if leading:
                if block.block_hash == block_hash:
                    start = i + 1
                else:
                    leading = False  # its hash is another block's: this one is retried next time
        request.num_keyed_blocks = start

    def free(self, request: Request) -> None:
        # Blocks past the computed tokens were keyed at scheduling time but their KV was never
        # written (a request preempted in the step that scheduled them): un-key them, or a
        # later request would take stale KV as a hit.
        for i in range(request.num_computed_tokens // self.block_size, len(request.block_ids)):
            block = self.pool.blocks[request.block_ids[i]]
            if block.ref_cnt == 1 and block.block_hash is not None:
                del self.pool.cached[block.block_hash]
                block.block_hash = None
        for block_id in reversed(request.block_ids):
            self.pool.release(block_id)
        request.block_ids = []
        request.num_keyed_blocks = 0

    def trim(self, request: Request) -> None:
        """Give back blocks past the computed tokens (the slots of rejected drafts). They were
        never keyed: only full blocks of the request's own tokens are."""
        keep = self.blocks_for(request.num_computed_tokens)
        while len(request.block_ids) > keep:
            self.pool.release(request.block_ids.pop())

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
