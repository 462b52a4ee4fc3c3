"""Property tests on the scheduler + KV cache manager alone (no model, no torch)."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.helpers import make_request
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler

BLOCK = 4
PREFIXES = [[7] * 9, [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 8, 7, 7]]


def check(sched: Scheduler, out=None):
    kv = sched.kv
    kv.check_invariants()
    held = sum(len(r.block_ids) for r in sched.running)
    assert held == sum(kv.ref_count(b) for b in range(kv.num_blocks))
    assert all(not r.block_ids for r in sched.waiting)
    assert len(sched.running) <= sched.max_num_seqs
    if out is not None:
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        for c in out.chunks:
            assert c.num_tokens >= 1
            assert len(c.request.block_ids) * BLOCK >= c.end + c.num_lookahead
            assert c.request.status is RequestStatus.RUNNING
            if c.num_lookahead:
                assert c.num_tokens == 1 and c.samples
                assert c.end + c.num_lookahead < c.request.max_total_tokens


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 20), st.integers(-1, 2)),
        st.tuples(st.just("step"), st.integers(1, 3)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=ops,
    num_blocks=st.integers(16, 48),
    budget=st.integers(1, 48),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
    seed=st.integers(0, 1000),
    lookahead=st.sampled_from([0, 0, 1, 3, 5]),
)
def test_random_interleavings_never_leak(ops, num_blocks, budget, max_seqs, caching, seed, lookahead):
    """lookahead > 0 adds speculative decoding: random drafts (fewer than reserved at times),
    a random number of them accepted, the rest's slots given back."""
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, BLOCK, enable_caching=caching)
    sched = Scheduler(kv, max_seqs, budget, max_model_len=64, num_speculative_tokens=lookahead,
                      speculative_disable_by_batch_size=rng.randint(1, 6))
    ids = []

    def step():
        out = sched.schedule()
        check(sched, out)
        # Tokens from a tiny alphabet so that generated text repeats and shares blocks too.
        sampled = {}
        for c in out.chunks:
            if c.num_lookahead:
                c.draft_token_ids = [rng.randrange(3) for _ in range(rng.randint(0, c.num_lookahead))]
            if c.samples:
                accepted = rng.randint(0, len(c.draft_token_ids))
                sampled[c.request.request_id] = c.draft_token_ids[:accepted] + [rng.randrange(3)]
        expected = {c.request: c.request.num_tokens + len(sampled.get(c.request.request_id, [])) for c in out.chunks}
        for r in sched.update(out, sampled):
            assert not r.block_ids
        for r, n in expected.items():
            if not r.is_finished and r.status is RequestStatus.RUNNING:
                assert r.num_tokens == n and r.num_computed_tokens == n - 1 or not sampled.get(r.request_id)
                assert len(r.block_ids) == kv.blocks_for(r.num_computed_tokens)
        check(sched)
        return out

    for op in ops:
        if op[0] == "add":
            _, plen, max_tokens, prefix = op
            prompt = (PREFIXES[prefix] if prefix >= 0 else []) + [rng.randrange(20) for _ in range(plen)]
            r = make_request(f"r{len(ids)}", prompt, max_tokens=max_tokens)
            try:
                sched.add_request(r)
                ids.append(r.request_id)
            except ValueError:
                assert kv.blocks_for(r.max_total_tokens) > num_blocks or r.max_total_tokens > 64
        elif op[0] == "step":
            for _ in range(op[1]):
                step()
        else:
            if ids:
                sched.abort(ids[op[1] % len(ids)])
                check(sched)

    for _ in range(5000):  # drain: every admitted request must finish
        if not sched.has_unfinished:
            break
        out = step()
        assert not out.is_empty, "scheduler stalled with unfinished requests"
    assert not sched.has_unfinished
    assert kv.num_free_blocks == kv.num_blocks


def test_preemption_picks_least_work_and_counts():
    kv = KVCacheManager(6, BLOCK)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    a = make_request("a", list(range(8)), max_tokens=12)  # 2 blocks
    b = make_request("b", list(range(100, 104)), max_tokens=12)  # 1 block
    c = make_request("c", list(range(200, 208)), max_tokens=12)  # 2 blocks
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()
    assert [x.request.request_id for x in out.chunks] == ["a", "b", "c"]
    sched.update(out, {"a": [1], "b": [1], "c": [1]})
    # Decode until the pool (6 blocks) runs out: b has the least computed work, so it goes.
    while not sched.num_preemptions:
        out = sched.schedule()
        sched.update(out, {x.request.request_id: [1] for x in out.chunks if x.samples})
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and not b.block_ids
    assert sched.num_preemptions == 1 and b.num_preemptions == 1
    check(sched)


def test_request_that_can_never_fit_is_refused():
    kv = KVCacheManager(4, BLOCK)
    sched = Scheduler(kv, 4, 64, max_model_len=64)
    too_long = make_request("x", [1] * 60, max_tokens=10)
    bigger_than_pool = make_request("y", [1] * 10, max_tokens=10)
    for r, msg in ((too_long, "maximum context length"), (bigger_than_pool, "whole pool")):
        try:
            sched.add_request(r)
        except ValueError as e:
            assert msg in str(e)
        else:
            raise AssertionError("should have been refused")
    assert not sched.has_unfinished


def test_prefix_blocks_are_shared_and_evicted_lru_leaves_first():
    kv = KVCacheManager(8, BLOCK)
    sched = Scheduler(kv, 4, 64, max_model_len=64)
    prompt = list(range(13))  # 3 full blocks + 1 token
    first = make_request("a", prompt, max_tokens=1)
    sched.add_request(first)
    out = sched.schedule()
    first_chain = list(first.block_ids[:3])
    sched.update(out, {"a": [5]})
    assert first.is_finished and kv.num_free_blocks == 8
    second = make_request("b", prompt + [99], max_tokens=1)
    sched.add_request(second)
    out = sched.schedule()
    assert second.num_cached_tokens == 12 and out.chunks[0].num_tokens == 2
    chain = list(second.block_ids)  # [shared 0, shared 1, shared 2, own 3]
    assert chain[:3] == first_chain
    sched.update(out, {"b": [5]})
    # Freed tail-first, so in LRU order a chain's leaf is evicted before its parents.
    assert [b for b in kv.eviction_order() if b in chain] == list(reversed(chain[:3]))
    assert kv.num_free_blocks == kv.num_blocks
    # Eviction under pressure: 7 new blocks, 5 never-cached free ones go first, then the two
    # deepest blocks of the chain; its root survives.
    big = make_request("c", list(range(500, 528)), max_tokens=4)
    sched.add_request(big)
    out = sched.schedule()
    assert kv.num_evictions == 2
    hashes = second.block_hashes
    assert kv.cached_block(hashes[0]) == chain[0]
    assert kv.cached_block(hashes[1]) is None and kv.cached_block(hashes[2]) is None
    sched.abort("c")
    assert kv.num_free_blocks == kv.num_blocks


def test_prefix_lookups_are_counted_once_per_admission():
    kv = KVCacheManager(5, BLOCK)
    sched = Scheduler(kv, 4, 64, max_model_len=64)
    a = make_request("a", list(range(16)), max_tokens=4)  # 4 blocks, 5 at most
    b = make_request("b", list(range(100, 108)), max_tokens=4)  # must wait for a
    sched.add_request(a)
    sched.add_request(b)
    waited = 0
    while sched.has_unfinished:
        out = sched.schedule()
        waited += b.status is RequestStatus.WAITING
        sched.update(out, {c.request.request_id: [1] for c in out.chunks if c.samples})
    assert waited >= 2  # b's lookup was retried while it waited
    assert sched.num_preemptions == 0
    assert kv.prefix_queries == 16 + 8
    assert kv.num_free_blocks == kv.num_blocks


def _spec_scheduler(num_blocks, k=4):
    kv = KVCacheManager(num_blocks, BLOCK)
    return Scheduler(kv, 4, 64, 64, num_speculative_tokens=k, speculative_disable_by_batch_size=4)


def test_lookahead_never_causes_a_preemption():
    """Drafts get only what nobody else needs: with the pool nearly full, a request's lookahead
    must not take the block another request's next token needs."""
    for k in (0, 4):
        sched = _spec_scheduler(5, k)
        a = make_request("a", list(range(6)), max_tokens=10)
        b = make_request("b", list(range(100, 108)), max_tokens=10)
        sched.add_request(a)
        sched.add_request(b)
        sched.update(sched.schedule(), {"a": [1], "b": [1]})  # prefill: 2 + 3 blocks... of 5
        out = sched.schedule()
        assert sched.num_preemptions == 0, k
        assert {c.request.request_id for c in out.chunks} == {"a", "b"}


def test_drafts_that_keep_missing_pause_speculation():
    """All-rejected verify steps pause drafting for 1, 3, 7, then 15 steps; a hit resets it."""
    sched = _spec_scheduler(64)
    r = make_request("r", [1, 2, 3], max_tokens=60)
    sched.add_request(r)
    sched.update(sched.schedule(), {"r": [7]})
    drafted_steps = []
    for step in range(40):
        out = sched.schedule()
        (chunk,) = out.chunks
        if chunk.num_lookahead:
            chunk.draft_token_ids = [9] * chunk.num_lookahead
            drafted_steps.append(step)
        sched.update(out, {"r": [8]})  # the target never agrees with the drafts
    gaps = [b - a - 1 for a, b in zip(drafted_steps, drafted_steps[1:])]
    assert gaps[:4] == [1, 3, 7, 15]
    assert r.draft_len == 1
    # A hit: k grows back and the pause is gone.
    while True:
        out = sched.schedule()
        (chunk,) = out.chunks
        if chunk.num_lookahead:
            break
        sched.update(out, {"r": [8]})
    chunk.draft_token_ids = [5] * chunk.num_lookahead
    sched.update(out, {"r": chunk.draft_token_ids + [6]})
    assert r.spec_pause == 0 and r.spec_misses == 0 and r.draft_len == 2
