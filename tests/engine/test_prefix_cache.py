"""Prefix caching end to end on a tiny model: output with the cache on is token-identical
(greedy) to output with it off, hits are counted, and the pool always ends whole."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.engine.helpers import assert_pool_whole
from tests.tiny import VOCAB
from tokenmill import LLM, SamplingParams

BS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, VOCAB) for _ in range(n)]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return tiny_models("llama")[1]


def _llm(loaded, cache: bool, **cfg) -> LLM:
    cfg.setdefault("num_kv_blocks", 128)
    return LLM("tiny", loaded=loaded, block_size=BS, debug_checks=True, enable_prefix_caching=cache, **cfg)


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _reference(loaded, prompts, params=GREEDY, **cfg) -> list[list[int]]:
    """Cache-off output, each prompt alone in a roomy pool."""
    llm = _llm(loaded, False, **{**cfg, "num_kv_blocks": 256})
    return [_ids(llm.generate([p], params))[0] for p in prompts]


def test_shared_prefix_batch(loaded):
    rng = random.Random(0)
    system = _tokens(rng, 43)  # 5 full blocks + 3 tokens
    prompts = [system + _tokens(rng, n) for n in (1, 3, 5, 8, 13, 21)]
    ref = _reference(loaded, prompts)

    off = _llm(loaded, False)
    assert _ids(off.generate(prompts, GREEDY)) == ref
    assert off.engine.kv.prefix_hits == 0
    assert_pool_whole(off.engine)

    on = _llm(loaded, True)
    outs = on.generate(prompts, GREEDY)
    assert _ids(outs) == ref
    # The first request computes the system prompt; the others in the same batch reuse its
    # 5 full blocks (the 6th block also holds suffix tokens, so it differs per prompt).
    assert outs[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in outs[1:]] == [40] * 5
    assert on.engine.kv.prefix_hits == 5 * 40
    assert on.engine.kv.prefix_queries == sum(map(len, prompts))
    assert on.engine.stats.prefix_cache_hits == 5 * 40
    assert_pool_whole(on.engine)

    # Run again: every prompt now hits all its full blocks but the one holding its last token.
    again = on.generate(prompts, GREEDY)
    assert _ids(again) == ref
    for p, o in zip(prompts, again):
        assert o.num_cached_tokens == (len(p) - 1) // BS * BS
    assert_pool_whole(on.engine)


def test_multi_turn_chat_reuses_answers(loaded):
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    on, off = _llm(loaded, True), _llm(loaded, False)
    prompt = _tokens(rng, 30)
    for turn in range(4):
        ref = _ids(off.generate([prompt], params))[0]
        out = on.generate([prompt], params)[0]
        assert out.outputs[0].token_ids == ref
        if turn:
            # Everything up to the last sampled token of the previous turn was computed; all
            # full blocks of it are cached, generated tokens included.
            assert out.num_cached_tokens >= prev_len - BS
            assert out.num_cached_tokens > prev_prompt_len  # covers part of the previous answer
        prev_prompt_len = len(prompt)
        prev_len = len(prompt) + len(ref)
        prompt = prompt + ref + _tokens(rng, 5 + 3 * turn)
    assert off.engine.kv.prefix_hits == 0
    assert_pool_whole(on.engine)
    assert_pool_whole(off.engine)


@pytest.mark.parametrize("length", [BS * 2 - 1, BS * 2, BS * 2 + 1, BS * 4, BS * 4 + 1])
def test_block_boundaries(loaded, length):
    rng = random.Random(length)
    base = _tokens(rng, length)
    # the same prompt twice, a longer one that extends it, a shorter one that it extends
    prompts = [base, base, base + _tokens(rng, 3), base[: length - 1]]
    ref = _reference(loaded, prompts)
    on = _llm(loaded, True)
    outs = [on.generate([p], GREEDY)[0] for p in prompts]
    assert _ids(outs) == ref
    # A prompt never hits its own last token: its logits are needed for the next one.
    assert outs[0].num_cached_tokens == 0
    assert outs[1].num_cached_tokens == (length - 1) // BS * BS
    # base + 3: the whole of base's full blocks, and the block holding base's last token (it
    # was filled by base's first generated tokens, which differ from the new tokens) isn't.
    assert outs[2].num_cached_tokens == length // BS * BS
    assert outs[3].num_cached_tokens == (length - 2) // BS * BS
    assert_pool_whole(on.engine)


def test_eviction_pressure(loaded):
    rng = random.Random(2)
    systems = [_tokens(rng, 24) for _ in range(3)]
    prompts = [systems[i % 3] + _tokens(rng, 2 + i) for i in range(12)]
    ref = _reference(loaded, prompts)
    # 10 blocks: one request at a time fits (at most 37 + 12 tokens = 7 blocks), three
    # cached systems plus answers do not.
    on = _llm(loaded, True, num_kv_blocks=10, max_num_seqs=1)
    outs = [on.generate([p], GREEDY)[0] for p in prompts]
    assert _ids(outs) == ref
    assert on.engine.kv.num_evictions > 0
    assert on.engine.kv.prefix_hits > 0  # some systems survived long enough to be reused
    assert_pool_whole(on.engine)
    # ...and all at once, in the same small pool
    on2 = _llm(loaded, True, num_kv_blocks=10, max_num_batched_tokens=16)
    assert _ids(on2.generate(prompts, GREEDY)) == ref
    assert on2.engine.kv.num_evictions > 0
    assert_pool_whole(on2.engine)


@pytest.mark.parametrize("budget", [32, 512])
def test_preemption(loaded, budget):
    rng = random.Random(3)
    system = _tokens(rng, 20)
    prompts = [system + _tokens(rng, n) for n in (4, 9, 17, 30, 2, 11)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = _reference(loaded, prompts, params)
    for cache in (False, True):
        llm = _llm(loaded, cache, num_kv_blocks=14, max_num_batched_tokens=budget)
        assert _ids(llm.generate(prompts, params)) == ref, cache
        assert llm.engine.stats.num_preemptions > 0
        assert_pool_whole(llm.engine)
        if cache:
            assert llm.engine.kv.prefix_hits > 0


def test_n_children_share_the_prompt(loaded):
    rng = random.Random(4)
    prompt = _tokens(rng, 27)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=3)
    on = _llm(loaded, True)
    out = on.generate([prompt], params)[0]
    ref = _reference(loaded, [prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [ref] * 3
    # RequestOutput reports the least cached child: the first computed the prompt.
    assert out.num_cached_tokens == 0
    assert on.engine.kv.prefix_hits == 2 * 24
    assert_pool_whole(on.engine)


def test_reset_prefix_cache(loaded):
    rng = random.Random(5)
    prompt = _tokens(rng, 33)
    on = _llm(loaded, True)
    first = on.generate([prompt], GREEDY)[0]
    kv = on.engine.kv
    assert kv.num_cached_blocks
    # Not while a request holds blocks.
    on.engine.add_request("busy", prompt, GREEDY)
    on.engine.step()
    assert on.engine.reset_prefix_cache() is False
    assert kv.num_cached_blocks
    on.engine.abort_request("busy")
    assert_pool_whole(on.engine)
    assert on.engine.reset_prefix_cache() is True
    # No hash left anywhere: the invariants tie every keyed block to an entry of the cache.
    assert kv.num_cached_blocks == 0
    assert_pool_whole(on.engine)
    again = on.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert on.generate([prompt], GREEDY)[0].num_cached_tokens == 32


def test_cache_off_never_hits(loaded):
    rng = random.Random(6)
    prompt = _tokens(rng, 40)
    off = _llm(loaded, False)
    outs = off.generate([prompt, prompt], GREEDY) + off.generate([prompt], GREEDY)
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0]
    assert off.engine.kv.prefix_hits == 0
    assert off.engine.kv.num_cached_blocks == 0
    assert off.engine.kv.num_evictions == 0
    # What it would have found: the second and third runs of the prompt, two full blocks each
    # (the last token is always computed, so 40 tokens share at most 32).
    assert off.engine.kv.missed_prefix_hits == 2 * 32
    assert off.engine.stats.prefix_cache_missed_hits == 2 * 32


def test_missed_hits_count_only_shared_leading_blocks_and_forget_old_ones(loaded):
    rng = random.Random(8)
    a, b = _tokens(rng, 40), _tokens(rng, 40)
    off = _llm(loaded, False, num_kv_blocks=12)
    off.generate([a], GREEDY)
    off.generate([b[:16] + a[16:]], GREEDY)  # same tokens after a different first block: no prefix
    assert off.engine.kv.missed_prefix_hits == 0
    off.generate([a[:20] + b[20:]], GREEDY)  # two leading blocks (of 8) shared
    assert off.engine.kv.missed_prefix_hits == 16
    for _ in range(3):  # more distinct blocks than a pool of 12 could have kept
        off.generate([_tokens(rng, 40)], GREEDY)
    off.generate([a], GREEDY)
    assert off.engine.kv.missed_prefix_hits == 16
    on = _llm(loaded, True)
    on.generate([a, a], GREEDY)
    assert on.engine.kv.missed_prefix_hits == 0  # counted only while caching is off


# -- random interleavings at the engine level ------------------------------------------------
_PREFIX_RNG = random.Random(7)
PREFIXES = [_tokens(_PREFIX_RNG, n) for n in (16, 11, 24)]

engine_ops = st.lists(
    st.one_of(
        # add: prefix index (-1: none), prefix length cut, suffix length, max_tokens
        st.tuples(st.just("add"), st.integers(-1, 2), st.integers(0, 24), st.integers(1, 10), st.integers(1, 8)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=engine_ops, num_blocks=st.integers(8, 24), budget=st.integers(4, 40), seed=st.integers(0, 999))
def test_engine_random_interleavings(loaded, ops, num_blocks, budget, seed):
    rng = random.Random(seed)
    llm = LLM(
        "tiny", loaded=loaded, block_size=4, num_kv_blocks=num_blocks, max_num_batched_tokens=budget,
        max_num_seqs=4, debug_checks=True, enable_prefix_caching=True,
    )
    engine = llm.engine
    ids: list[str] = []
    finished: dict[str, list[int]] = {}
    prompts: dict[str, tuple[list[int], int]] = {}

    def step():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        engine.check_invariants()

    for op in ops:
        if op[0] == "add":
            _, which, cut, suffix, max_tokens = op
            prompt = (PREFIXES[which][:cut] if which >= 0 else []) + _tokens(rng, suffix)
            rid = f"r{len(ids)}"
            try:
                engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            except ValueError:
                continue  # more than the whole pool
            ids.append(rid)
            prompts[rid] = (prompt, max_tokens)
        elif op[0] == "step":
            for _ in range(op[1]):
                step()
        elif ids:
            rid = ids[op[1] % len(ids)]
            if engine.abort_request(rid) is not None:
                prompts.pop(rid)
            engine.check_invariants()
    for _ in range(1000):
        if not engine.has_unfinished:
            break
        step()
    assert not engine.has_unfinished
    assert_pool_whole(engine)
    assert all(engine.kv.ref_count(b) == 0 for b in range(engine.kv.num_blocks))
    # Whatever was shared, evicted or preempted, completed requests match a cache-off run.
    ref = _llm(loaded, False, num_kv_blocks=64)
    for rid, (prompt, max_tokens) in prompts.items():
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        assert finished[rid] == _ids(ref.generate([prompt], params))[0], rid


# -- bug: a preempted request leaves blocks keyed but never computed ------------------------
# allocate_slots() keys the full blocks of a chunk before the forward pass; when the scheduler
# then preempts that request in the same step (the victim is scheduled before the request that
# runs out of blocks), its chunk never runs but KVCacheManager.free() returns the blocks to
# the free queue still keyed. A later request with the same tokens hits KV that was never
# written. Fix: in KVCacheManager.free(), un-key the blocks at index >= num_computed_tokens //
# block_size that this request alone holds, before releasing them (see the report).
P = [62, 100, 365, 78, 215, 54, 225, 33, 190, 211, 8, 147, 134, 150, 75, 289, 14, 282, 46, 61]
Q = [
    ([62, 100, 365, 78, 215, 54, 225, 33, 245, 15, 313, 351, 358, 224], 9),
    ([48, 175, 339, 290, 205, 224, 92, 111], 5),
    ([62, 100, 305], 9),  # decoding position 3 (a block's last slot) when it is preempted
    ([62, 100, 365, 78, 215, 54, 334, 157, 246, 54, 227, 244, 143], 2),
]


def _written_tracker(engine):
    """Wrap the runner: record, per KV slot, the token prefix whose KV it holds; return a
    check that every keyed block holds the KV of exactly the tokens its key names."""
    bs = engine.kv.block_size
    written: dict[int, tuple] = {}
    prefixes: dict[bytes, tuple] = {}
    execute = engine.runner.execute

    def wrapped(record):
        for s in record.seqs:
            toks = engine.scheduler.requests[s.request_id].all_token_ids
            for p in range(s.start, s.start + s.num_computed):
                written[s.block_ids[p // bs] * bs + p % bs] = tuple(toks[: p + 1])
        return execute(record)

    engine.runner.execute = wrapped

    def stale_blocks() -> list[int]:
        for r in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            toks = r.all_token_ids
            for i, h in enumerate(r.block_hashes):
                prefixes[h] = tuple(toks[: (i + 1) * bs])
        bad = []
        for h, pre in prefixes.items():
            b = engine.kv.cached_block(h)
            if b is not None and any(written.get(b * bs + j) != pre[: len(pre) - bs + j + 1] for j in range(bs)):
                bad.append(b)
        return bad

    return stale_blocks


def test_preempted_chunk_is_not_left_cached(loaded):
    def greedy(n):
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    llm = LLM("tiny", loaded=loaded, block_size=4, num_kv_blocks=10, max_num_batched_tokens=8,
              max_num_seqs=4, debug_checks=True, enable_prefix_caching=True)
    engine = llm.engine
    stale_blocks = _written_tracker(engine)
    llm.generate([P], greedy(1))
    for k, (prompt, n) in enumerate(Q):
        engine.add_request(f"q{k}", prompt, greedy(n))
    stale = []
    while engine.has_unfinished and not stale:
        engine.step()
        stale = stale_blocks()
    assert engine.stats.num_preemptions > 0
    # q2's prompt + its first greedy token (236), then more: hits the block keyed at q2's
    # preemption, whose last slot was never written.
    follow = [62, 100, 305, 236, 7, 8, 9, 10, 11]
    for k in range(len(Q)):
        engine.abort_request(f"q{k}")
    out = llm.generate([follow], greedy(8))[0]
    ref = _llm(loaded, False).generate([follow], greedy(8))[0]
    assert stale == []
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
