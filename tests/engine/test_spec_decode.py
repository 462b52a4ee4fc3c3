"""Speculative decoding in the engine: greedy output token-identical to plain decoding with
either proposer (chunked prefill, preemption, mixed batches), sampled output distributed as
without speculation, rejected drafts' KV slots given back."""

import dataclasses
import random

import pytest
import torch

from tests.engine.helpers import assert_pool_whole
from tests.stats import chi_square_p_value
from tests.tiny import VOCAB, Loaded, tiny_tokenizer
from tokenmill import LLM, SamplingParams
from tokenmill.model import rejection

MAX_TOKENS = 40


def _prompts(seed=0):
    # Repeated stretches give prompt lookup something to find; random models also tend to
    # fall into loops, which it then copies.
    rng = random.Random(seed)
    prompts = []
    for n in (5, 16, 23, 40):
        base = [rng.randrange(2, VOCAB) for _ in range(n)]
        prompts.append(base + base[: n // 2] + base)
    return prompts


@pytest.fixture(scope="module")
def draft_models(tiny_models):
    """The target's first layer alone (layer skipping): a smaller model over the same
    tokenizer that agrees with the target about half the time."""
    _, loaded = tiny_models("llama")
    return {"other": Loaded(dataclasses.replace(loaded.config, num_layers=1), loaded.weights, loaded.tokenizer)}


SCENARIOS = {
    "roomy": dict(num_kv_blocks=256, max_num_batched_tokens=512),
    "chunked": dict(num_kv_blocks=256, max_num_batched_tokens=16),
    "preempting": dict(num_kv_blocks=24, max_num_batched_tokens=32),
}


def _params():
    """Greedy for all; one request with a repetition penalty, which never speculates, so the
    batch mixes speculating and plain requests."""
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    penalised = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.2)
    return [plain, plain, penalised, plain]


@pytest.fixture(scope="module")
def reference(tiny_models):
    _, loaded = tiny_models("llama")
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=256)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), _params())]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-other"])
def test_greedy_identical_to_plain_decoding(method, scenario, tiny_models, draft_models, reference):
    _, loaded = tiny_models("llama")
    spec = dict(speculative_method=method.split("-")[0], num_speculative_tokens=4, speculative_disable_by_batch_size=8)
    draft = {"draft-self": loaded, "draft-other": draft_models["other"]}.get(method)
    llm = LLM("tiny", loaded=loaded, draft_loaded=draft, block_size=8, debug_checks=True, **spec, **SCENARIOS[scenario])
    outs = llm.generate(_prompts(), _params())
    assert [o.outputs[0].token_ids for o in outs] == reference
    s = llm.engine.stats
    assert s.spec_num_draft_tokens > 0 and s.spec_num_accepted_tokens > 0
    if method == "draft-self":
        # The target as its own draft: every draft is the target's argmax.
        assert s.spec_acceptance_rate > 0.95
    if method == "draft-other":
        assert 0.1 < s.spec_acceptance_rate < 0.9  # rejections were exercised
    if scenario == "preempting":
        assert s.num_preemptions > 0
    assert sum(s.spec_accepted_per_pos) == s.spec_num_accepted_tokens
    assert_pool_whole(llm.engine)


def test_stops_inside_accepted_drafts_match_plain_decoding(tiny_models):
    """EOS, stop strings and max_tokens falling among accepted drafts end the output exactly
    where one-by-one decoding ends it (target as its own draft: long accepted runs)."""
    _, loaded = tiny_models("llama")
    prompts = _prompts(1)
    plain_llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=256)
    free = plain_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    # Stop on a token / a piece of text that plain decoding produces mid-way.
    params = []
    for i, o in enumerate(free):
        ids, text = o.outputs[0].token_ids, o.outputs[0].text
        if i % 2 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[ids[11]]))
        else:
            params.append(SamplingParams(temperature=0, max_tokens=30, stop=[text[len(text) // 2 : len(text) // 2 + 2]]))
    params.append(SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    prompts.append(prompts[0])
    spec_llm = LLM("tiny", loaded=loaded, draft_loaded=loaded, block_size=8, num_kv_blocks=256, debug_checks=True,
                   speculative_method="draft", num_speculative_tokens=5, speculative_disable_by_batch_size=8)
    want = plain_llm.generate(prompts, params)
    got = spec_llm.generate(prompts, params)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        assert g.outputs[0].stop_reason == w.outputs[0].stop_reason
    assert spec_llm.engine.stats.spec_num_accepted_tokens > 0
    assert_pool_whole(spec_llm.engine)


def test_speculation_pauses_above_the_batch_size_limit(tiny_models):
    _, loaded = tiny_models("llama")
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=256,
              speculative_method="ngram", speculative_disable_by_batch_size=2)
    llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert llm.engine.stats.spec_num_draft_tokens == 0  # four running > 2


def _joint_counts(llm, prompt, n):
    # Unseeded: a seeded sampled request never speculates (its output must not depend on the
    # batch), so the draws come from each engine's own generator.
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    outs = llm.generate([prompt] * n, params)
    counts = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids[1:3])  # tokens 2 and 3: drafted, verified, bonus
        counts[key] = counts.get(key, 0) + 1
    return counts


def _p_value(a: dict, b: dict) -> float:
    keys = sorted(set(a) | set(b))
    return chi_square_p_value(torch.tensor([a.get(k, 0) for k in keys]), torch.tensor([b.get(k, 0) for k in keys]))


@pytest.fixture(scope="module")
def sampling_setup(tiny_models):
    _, loaded = tiny_models("llama")
    common = dict(block_size=8, num_kv_blocks=512, max_num_seqs=128, max_waiting_requests=4096)
    plain = LLM("tiny", loaded=loaded, **common)
    # The target as its own greedy draft: its argmax is kept with probability p(argmax), so
    # both acceptances and rejections (with the residual draw) happen often.
    spec = LLM("tiny", loaded=loaded, draft_loaded=loaded, speculative_method="draft", num_speculative_tokens=3,
               speculative_disable_by_batch_size=1000, **common)
    rng = random.Random(3)
    prompt = [rng.randrange(2, VOCAB) for _ in range(12)]
    n = 2000
    return plain, spec, prompt, n, _joint_counts(plain, prompt, n)


@pytest.mark.slow
def test_sampled_distribution_matches_plain_decoding(sampling_setup):
    plain, spec, prompt, n, reference = sampling_setup
    counts = _joint_counts(spec, prompt, n)
    s = spec.engine.stats
    assert s.spec_num_accepted_tokens > 0 and s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert _p_value(counts, reference) > 1e-3
    assert_pool_whole(spec.engine)


WRONG_RULES = {
    # keep every draft: the output follows the draft (the argmax) far too often
    "accept_all": ("accept_mask", lambda u, p, q: torch.ones_like(p, dtype=torch.bool)),
    # after a rejection, draw from p instead of max(0, p - q): the rejected draft comes back
    "residual_is_p": ("residual_distribution", lambda p, q: p),
}


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(WRONG_RULES))
def test_a_wrong_acceptance_rule_fails_the_same_test(rule, sampling_setup, monkeypatch):
    plain, spec, prompt, n, reference = sampling_setup
    monkeypatch.setattr(rejection, *WRONG_RULES[rule])
    counts = _joint_counts(spec, prompt, n)
    assert _p_value(counts, reference) < 1e-3


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_models):
    """Whether a step speculates depends on the rest of the batch; a seeded request's output
    must not, so it decodes without drafts and matches the engine without speculation."""
    _, loaded = tiny_models("llama")
    spec = dict(draft_loaded=loaded, speculative_method="draft", speculative_disable_by_batch_size=4)
    seeded = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, seed=42)
    others = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompt, crowd = _prompts()[0], _prompts(2)[:2]  # 3 running: speculation is on
    alone = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=256, **spec).generate([prompt], seeded)
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=256, **spec)
    batch = llm.generate([prompt] + crowd, [seeded] + [others] * len(crowd))
    plain = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=256).generate([prompt], seeded)
    assert alone[0].outputs[0].token_ids == batch[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert llm.engine.stats.spec_num_draft_tokens > 0  # the greedy crowd did speculate


def test_draft_model_with_another_tokenizer_is_refused(tiny_models):
    _, loaded = tiny_models("llama")
    other = tiny_tokenizer().backend.__class__.from_str(tiny_tokenizer().backend.to_str())
    other.add_tokens(["<extra-token>"])
    bad_tok = type(tiny_tokenizer())(other, bos_token_id=0, eos_token_ids=[1])
    draft = Loaded(loaded.config, loaded.weights, bad_tok)
    with pytest.raises(ValueError, match="tokenizer differs"):
        LLM("tiny", loaded=loaded, draft_loaded=draft, speculative_method="draft")


def test_bad_speculative_config_is_refused():
    with pytest.raises(ValueError, match="speculative_method"):
        LLM("tiny", speculative_method="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        LLM("tiny", speculative_method="ngram", num_speculative_tokens=0)


def test_draft_with_a_smaller_embedding_table(tiny_models):
    """One tokenizer, tables padded to different sizes: ids past the draft's table must neither
    crash the draft nor change the target's output."""
    _, loaded = tiny_models("llama")
    small = dataclasses.replace(loaded.config, vocab_size=VOCAB - 16)
    weights = dict(loaded.weights)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name][: VOCAB - 16]
    draft = Loaded(small, weights, loaded.tokenizer)
    prompt = [VOCAB - 1, VOCAB - 5, 7, 8, 9] * 4  # ids only the target's table has
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=64).generate([prompt], params)
    llm = LLM("tiny", loaded=loaded, draft_loaded=draft, block_size=8, num_kv_blocks=64, speculative_method="draft")
    got = llm.generate([prompt], params)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert llm.engine.stats.spec_num_draft_tokens > 0
