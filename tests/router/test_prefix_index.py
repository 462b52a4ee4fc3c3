"""The router's prefix prediction speaks the engine's language: the same block hashes, and
(with no eviction) exactly the hit the engine's KV cache manager then finds."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.router.prefix_index import PrefixIndex, block_hashes, usable_blocks
from tokenmill.sampling import SamplingParams

tokens = st.lists(st.integers(0, 50), min_size=0, max_size=80)


def _request(rid: str, ids: list[int]) -> Request:
    return Request(rid, ids, SamplingParams(max_tokens=1), 0, 1)


@given(ids=tokens, bs=st.sampled_from([1, 2, 4, 16]))
def test_block_hashes_are_the_engines(ids, bs):
    kv = KVCacheManager(num_blocks=64, block_size=bs)
    req = _request("r", ids)
    kv.get_computed_blocks(req)
    assert block_hashes(ids, bs) == req.block_hashes


# Shared by every example (one per memo size): later prompts meet blocks memoized by earlier ones.
_MEMOS: dict[bool, dict] = {True: {}, False: {}}


@given(ids=tokens, bs=st.sampled_from([1, 2, 4]), small=st.booleans())
def test_memoized_block_hashes_are_the_engines(ids, bs, small):
    import tokenmill.router.prefix_index as pi

    kv = KVCacheManager(num_blocks=256, block_size=bs)
    req = _request("r", ids)
    kv.get_computed_blocks(req)
    old = pi.MEMO_ENTRIES
    pi.MEMO_ENTRIES = 8 if small else old  # a memo that fills and starts over mid-prompt
    try:
        memo = _MEMOS[small]
        assert block_hashes(ids, bs, memo) == req.block_hashes
        assert block_hashes(ids, bs, memo) == req.block_hashes  # now from the memo
        assert len(memo) <= pi.MEMO_ENTRIES
    finally:
        pi.MEMO_ENTRIES = old


@settings(max_examples=60)
@given(first=tokens, second=tokens, shared=st.integers(0, 60), bs=st.sampled_from([2, 4, 8]))
def test_predicted_hit_is_the_engines_hit(first, second, shared, bs):
    second = first[:shared] + second  # a prompt that shares some prefix with the first
    kv = KVCacheManager(num_blocks=256, block_size=bs)
    index = PrefixIndex(capacity_blocks=1000)
    a = _request("a", first)
    if first:
        assert kv.allocate_slots(a, len(first))  # its blocks are keyed now, as the engine does
        a.num_computed_tokens = len(first)
        kv.free(a)
    index.insert(block_hashes(first, bs))

    b = _request("b", second)
    _, engine_hit = kv.get_computed_blocks(b)
    predicted = index.match(block_hashes(second, bs)[:usable_blocks(len(second), bs)])
    assert predicted * bs == engine_hit


def test_lru_forgets_leaves_before_their_parents():
    index = PrefixIndex(capacity_blocks=3)
    chain = block_hashes(list(range(16)), 4)  # 4 blocks
    index.insert(chain)
    assert len(index) == 3
    assert index.match(chain) == 3  # the leaf went, the first three still chain
    other = block_hashes([99] * 8, 4)
    index.insert(other)  # 2 newer blocks push out the older chain's tail
    assert index.match(other) == 2 and index.match(chain) == 1
    index.clear()
    assert index.match(other) == 0
