"""Which prompt prefixes each replica has probably cached, as the engine's own block hashes.

The engine keys its prefix cache by chained hashes of full blocks (tokenmill.engine.kv_cache
.hash_block); computing the same chain over the same token ids here means a predicted hit is
exactly the blocks the engine would find, as long as it has not evicted them. Eviction is
unknown to the router, so each replica's index is a bounded LRU: roughly the replica's KV
capacity, oldest forgotten first, as the engine's own free queue does.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tokenmill.engine.kv_cache import hash_block


MEMO_ENTRIES = 1 << 16  # ~10 MB of keys at block size 16; past it the memo starts over


def block_hashes(token_ids: list[int], block_size: int,
                 memo: dict[tuple, bytes] | None = None) -> list[bytes]:
    """The chained hash of every full block of `token_ids`, as the engine computes them.

    `memo` ((parent hash, block ids) -> hash, kept by the caller across requests): a system
    prompt or a conversation's history recurs request after request, and a dict lookup costs
    a fraction of a SHA-256 (about half the hashing time of a routed chat, on the router's
    critical path). Cleared when full rather than kept LRU: refilling it is just hashing."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        if memo is None:
            parent = hash_block(parent, block)
        else:
            key = (parent, tuple(block))
            h = memo.get(key)
            if h is None:
                if len(memo) >= MEMO_ENTRIES:
                    memo.clear()
                h = memo[key] = hash_block(parent, block)
            parent = h
        hashes.append(parent)
    return hashes


def usable_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks the engine can take from its cache: it always computes the last prompt token
    itself (its logits give the first output token), so a whole-prompt hit stops one short."""
    return max(0, (num_tokens - 1) // block_size)


@dataclass
class PrefixIndex:
    """One replica's predicted cache: block hash -> nothing, in LRU order."""

    capacity_blocks: int
    _blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` this replica should still hold. A chain is cut
        at its first miss: the engine can't use a block whose parent it lost."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: list[bytes]) -> None:
        """The replica is about to compute these blocks (or take them from its cache): they
        become the most recently used. Leaves go in first so a parent is always more recent
        than its children and outlives them, as in the engine (a request frees tail-first)."""
        for h in reversed(hashes):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
